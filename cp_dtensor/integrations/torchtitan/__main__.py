"""``python -m cp_dtensor.integrations.torchtitan`` / ``torchrun ... -m cp_dtensor.integrations.torchtitan``.

Python imports the package first (CPU fix 1, the train spec registered), then runs this file; ``main`` is
the package's own object, so the train spec and the config class torchtitan imports by name are the ones
registered here. A run that returns ends without interpreter teardown (Note [Ending a rank]); one that
raises exits through Python as usual, with its traceback.
"""

from cp_dtensor.integrations.torchtitan import main
from cp_dtensor.launch import end_process

if __name__ == "__main__":
    main()
    end_process(0)
