"""Analysis tools (the cost-model planner): code for scripts and studies, never imported by training."""
