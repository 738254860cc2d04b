"""Import models trained with the official state-spaces/s4 code (reading, mapping, refusals)."""
