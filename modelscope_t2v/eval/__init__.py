"""Evaluation of generated videos. `shapes`: reading shapes-world videos back (colour, shape, direction),
accuracy over prompt/seed pairs, contact sheets, and the caption probe (`evaluate.py` is its command line)."""
