"""Load tests of the S4 server: locust users (locustfile.py) and the sweep + report (run.py)."""
