"""Applications built on mlx_mtp: `mlx_mtp.apps.chat` is the `mlx-mtp chat` TUI,
`mlx_mtp.apps.serve` the `mlx-mtp serve` HTTP server.

Their sources live in the repository's top-level `apps/` folder. A wheel
copies that folder here (pyproject.toml force-includes apps/chat as
mlx_mtp/apps/chat, and apps/serve likewise), so nothing is installed under
the common top-level name `apps`. A source checkout or an editable install
(which imports mlx_mtp straight from the checkout) has no copy here: the
package then reads the checkout's `apps/` folder instead.
"""

from pathlib import Path

_here = Path(__file__).resolve().parent
_checkout_apps = _here.parent.parent / "apps"
# Only in a checkout: an installed wheel holds its own copy here, and a
# stray `apps` folder next to site-packages must never be picked up.
if not (_here / "chat").is_dir() and (_checkout_apps / "chat" / "app.py").is_file():
    __path__.append(str(_checkout_apps))  # noqa: F821 (set by the import system)
