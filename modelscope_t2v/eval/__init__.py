"""Evaluation of generated videos. `shapes`: reading shapes-world videos back (colour, shape, direction),
accuracy over prompt/seed pairs, contact sheets, and the caption probe. The citable metrics: `clipsim`
(frame-caption CLIP similarity), `fvd` (I3D features, the reference code's preprocessing) and `frechet`
(the distance and the reference statistics file); `harness` scores folders of videos with them, resumably
and sharded (`evaluate.py` is the command line of both)."""
