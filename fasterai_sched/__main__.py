"""`python -m fasterai_sched`: the main job (see `fasterai_sched.demo`)."""
from .demo import main

if __name__ == '__main__': raise SystemExit(main())
