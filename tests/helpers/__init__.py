"""What the tests share besides fixtures (``tests/conftest.py`` holds those): tiny settings
(:mod:`helpers.params`), tracked runs and the champion (:mod:`helpers.runs`), served models and
requests to them (:mod:`helpers.servers`), a metrics document (:mod:`helpers.documents`), a tiny
trainer (:mod:`helpers.trainers`), synthetic data sets (:mod:`helpers.synthetic_cells`), server
processes (:mod:`helpers.local_server`), PostgreSQL (:mod:`helpers.postgres`) and headless
Chromium (:mod:`helpers.chromium`).

``tests/`` is on ``sys.path`` (``pythonpath`` in pyproject.toml's pytest settings; benches and
docs scripts insert it), so tests write ``from helpers.params import tiny_params``. None of it is
part of the product.
"""
