"""The machinery under the app: settings, the bounded wait callback, engines and pools,
health, metrics, the loop-block detector, the embedded server, process helpers, sizing.

The app a reader copies lives at the top of the project (`app.py`, `db.py`, `models.py`,
`views.py`, ...) and imports from here; nothing here imports from the top.
"""

from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
