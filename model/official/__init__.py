"""Import models trained with the official state-spaces/s4 code (reading, mapping, refusals).

reference.py is not imported here: it runs in the official code's own venv (model.check_official)."""
