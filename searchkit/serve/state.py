"""What one server holds: its bundles, token, upload cap and thumbnail cache."""

from __future__ import annotations

from dataclasses import dataclass

from .bundles import Bundles
from .thumbnails import ThumbnailCache


@dataclass
class ServerState:
    bundles: Bundles
    token: str | None
    max_upload: int
    thumbnails: ThumbnailCache

    def close(self) -> None:
        self.bundles.close()
