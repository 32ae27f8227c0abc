"""The offline shapes world: the world itself (captions, rendering, the pixel checker, the appeal
score; world.py), its tiny models (models.py), how they are trained and cached (build.py,
`python -m shapes.build`) and how the world is measured (measure.py, `python -m shapes.measure`)."""
