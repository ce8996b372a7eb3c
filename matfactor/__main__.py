"""``python -m matfactor``: the ``matfactor`` command (:mod:`matfactor.adapters.command`).

The command belongs to the model side; this entry only hands over to it, so that the core never
imports it.
"""

from matfactor.adapters.command import main

if __name__ == "__main__":
    raise SystemExit(main())
