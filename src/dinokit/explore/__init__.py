"""`dinokit explore`: a local web application to look at what a model learned (attention heads, mass masks,
PCA of patch features, nearest neighbours in an index, a map of the index, a run's curves).

The command (`command.py`) imports nothing from the web stack until it runs, so that `dinokit` works without
the `explore` extra. The pieces: `maps.py` (what the model shows of one image), `library.py` (images under
`--data`, and the index map), `session.py` (the state behind the page), `server.py` (the HTTP routes), and
`static/` (the page).
"""
