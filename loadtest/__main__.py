"""`python -m loadtest`: the load-test sweep and report (see loadtest/run.py)."""

from loadtest.run import main

main()
