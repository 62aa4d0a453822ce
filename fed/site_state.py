"""What a site process keeps between messages, for every federated app: its cases (read once
per manifest), its optimiser moments between rounds (on its own disk, never sent), and the
per-round seeds that make a resumed run redo the same draws.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from synthct.artifacts import atomic_write_bytes
from synthct.config import SynthctConfig
from synthct.data.dataset import CaseSet, load_cases
from synthct.fed.errors import SiteError
from synthct.fed.payload import tensors_to_bytes

__all__ = ["ProcessCache", "load_site_cases", "round_seed", "OptimizerStateStore"]

logger = logging.getLogger(__name__)


class ProcessCache:
    """What a site process keeps between messages: the ``size`` most recently used entries.

    In Flower's simulation a few Ray actors serve every site in turn (4 sites on 2 actors in the
    demo), so a cache of one site's entry was replaced on nearly every message and each site
    re-read and re-featurised its cases every round. Holding a few sites' entries keeps them;
    in a deployment each message is its own ClientApp process and a cache spans one message.
    """

    def __init__(self, size: int = 8) -> None:
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The entry for ``key``, made by ``make()`` (and kept) when missing."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)  # the least recently used
        return value


_CASE_CACHE = ProcessCache()  # (manifest, site, mtime, vocabulary, split) -> CaseSet


def load_site_cases(
    config: SynthctConfig, manifest: str | Path, site: str, split: str = "train"
) -> CaseSet:
    """This site's cases of one split only; kept per process (``ProcessCache``) while the
    manifest is unchanged, so a site scoring its holdout every round reads it once. An empty
    ``train`` split is an error."""
    if site not in config.site_names:
        raise SiteError(f"site {site!r} is not in the run's config (sites: {config.site_names})")
    manifest = Path(manifest)
    if not manifest.is_file():
        raise SiteError(f"site {site!r}: manifest {manifest} not found")
    source = (
        str(manifest.resolve()),
        site,
        manifest.stat().st_mtime,
        config.labels.vocabulary_hash,
    )

    def read() -> CaseSet:
        cases = load_cases(manifest, config, splits=(split,), sites=(site,))
        if split == "train" and len(cases) == 0:
            raise SiteError(f"site {site!r}: no train cases in {manifest}")
        return cases

    return _CASE_CACHE.get((*source, split), read)


def round_seed(seed: int, phase: str, server_round: int, site: str) -> int:
    """Deterministic per (run seed, phase, round, site): resumed runs redo the same draws."""
    digest = hashlib.sha256(f"{seed}|{phase}|{server_round}|{site}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


class OptimizerStateStore:
    """A site's AdamW moments between rounds, kept on the site's own disk and never sent.

    Restarting Adam every round throws its moment estimates away, and the first steps after a
    restart are full-size sign-like updates; in a 30-round autoencoder phase that noise cost
    fidelity on small lesions. The state for round ``r`` is the newest saved one from a round
    before ``r`` (so a resumed run loads exactly what the uninterrupted run loaded); the two
    newest files are kept.
    """

    def __init__(self, root: Path, phase: str) -> None:
        self.root, self.phase = Path(root), phase

    def _files(self) -> dict[int, Path]:
        found = {}
        for path in self.root.glob(f"{self.phase}-round*.safetensors"):
            try:
                found[int(path.stem.rsplit("round", 1)[1])] = path
            except ValueError:
                continue
        return found

    def load_into(self, optimizer: torch.optim.Optimizer, server_round: int) -> int | None:
        """Fill ``optimizer`` with the newest state saved before ``server_round``; its round."""
        earlier = [r for r in self._files() if r < server_round]
        if not earlier:
            return None
        previous = max(earlier)
        path = self._files()[previous]
        try:
            flat = load_safetensors_bytes(path.read_bytes())
        except Exception as exc:  # a torn or foreign file: the site just restarts its moments
            logger.warning("optimizer state %s unreadable (%s); starting fresh", path, exc)
            return None
        state: dict[int, dict[str, torch.Tensor]] = {}
        for key, value in flat.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = value
        saved = optimizer.state_dict()
        params = [p for group in optimizer.param_groups for p in group["params"]]
        misfit = [
            i
            for i, entry in state.items()
            if i >= len(params)
            or any(v.dim() and v.shape != params[i].shape for v in entry.values())
        ]
        if misfit:  # saved for another parameter order or model: moments would land wrongly
            logger.warning("optimizer state %s does not fit its parameters; starting fresh", path)
            return None
        try:
            optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as exc:
            logger.warning("optimizer state %s does not fit (%s); starting fresh", path, exc)
            return None
        return previous

    def save(self, optimizer: torch.optim.Optimizer, server_round: int) -> None:
        flat = {
            f"{index}.{name}": value.detach().cpu().contiguous()
            for index, entry in optimizer.state_dict()["state"].items()
            for name, value in entry.items()
            if torch.is_tensor(value)
        }
        atomic_write_bytes(
            self.root / f"{self.phase}-round{server_round:04d}.safetensors",
            tensors_to_bytes(flat),
        )
        for old in sorted(self._files())[:-2]:
            self._files()[old].unlink(missing_ok=True)
