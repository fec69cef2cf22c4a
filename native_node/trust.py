"""The native node's server pins: shared.trust.ServerTrust with the pins kept in
`<state_dir>/servers.json` (written atomically)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from shared.trust import ServerTrust as _SharedTrust
from shared.trust import UntrustedServer

__all__ = ["ServerTrust", "UntrustedServer"]


class ServerTrust(_SharedTrust):
    def __init__(self, state_dir: Path, *, expected_server_id: str | None = None,
                 max_payload: int) -> None:
        self.path = state_dir / "servers.json"
        pins: dict[str, str] = {}
        if self.path.exists():
            try:
                loaded = json.loads(self.path.read_text())
                pins = {str(k): str(v) for k, v in loaded.items()}
            except (OSError, ValueError, AttributeError):
                pins = {}
        super().__init__(pins=pins, save_pins=self._save, expected_server_id=expected_server_id,
                         max_payload=max_payload)

    def _save(self, pins: dict[str, str]) -> None:
        tmp = self.path.with_name(f".servers.json.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(pins, indent=1, sort_keys=True))
        os.replace(tmp, self.path)
