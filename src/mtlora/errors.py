"""User-facing errors.

A ``UserError`` is a mistake the user can fix (bad file, bad config key, missing path). The CLI
prints it as one line, ``error: <file>[:<line>]: <what was expected>``, and exits with code 2,
without a traceback. Anything else is a bug and keeps its traceback.

The class is ``cvlm.errors.UserError``: one class for both command lines. It lives in ``cvlm``
because ``cvlm`` imports nothing from ``mtlora`` (it is installed, tested and cited on its own),
while ``mtlora`` may import ``cvlm``'s leaf modules (both ship in one distribution), as it does for
the device resolver (``cvlm.devices``).
"""

from __future__ import annotations

from cvlm.errors import USER_ERROR_EXIT_CODE, UserError

__all__ = ["USER_ERROR_EXIT_CODE", "UserError"]
