"""Integrations of cp_dtensor with other training frameworks (optional extras).

* :mod:`cp_dtensor.integrations.torchtitan` - torchtitan's trainer with cp_dtensor's ring attention, and
  torchtitan's Llama 3 model in cp_dtensor's trainer. Needs ``pip install "cp_dtensor[torchtitan]"``.

Nothing here is imported by ``import cp_dtensor``; each integration imports its framework when it is
imported itself.
"""
