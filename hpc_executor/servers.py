"""The served models of a run: one model-server job per distinct model and serve config, started
when a role needs it, adopted by a later driver from the record the ledger keeps, stopped when
nothing is left to ask."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from hpc_executor.ledger import Ledger
from hpc_executor.llm import LLM
from hpc_executor.llm.retry import RetryingLLM
from hpc_executor.model_server import ModelServer
from hpc_executor.scheduling import Scheduler

ROLES = ("ideator", "implementer")


def server_meta(key: str) -> str:
    """The ledger's meta key that holds a server's record (``ModelServer.start``: its token, job id
    and start time, as JSON) while it is (meant to be) up."""
    return f"model_server_job:{key}"


def saved_record(value: str | None) -> dict[str, Any]:
    """A server's record as the ledger keeps it; older runs kept the plain job id."""
    try:
        data = json.loads(value or "{}")
    except ValueError:  # "123_4"
        data = None
    return data if isinstance(data, dict) else {"job_id": value}  # "12345" reads as a number


def _record(ledger: Ledger, meta: str, record: dict[str, Any]) -> None:
    ledger.set_meta(meta, json.dumps(record))


class Servers:
    def __init__(
        self, models: DictConfig, scheduler: Scheduler, run_dir: Path, llm_of: Callable[[str], LLM]
    ) -> None:
        self.models = models  # cfg.model: a role's ``serve`` section says whether to serve it
        self.scheduler = scheduler
        self.folder = run_dir / "model_servers"
        self.llm_of = llm_of
        self._by_key: dict[str, ModelServer] = {}  # by a hash of model and serve config

    def roles_served(self) -> list[str]:
        return [role for role in ROLES if self.models[role].serve.enabled]

    def start(self, ledger: Ledger) -> None:
        """Serve the open models that roles asked to have served, or adopt the ones an earlier driver
        of this run left running; servers that are up already stay as they are. A server's token is in
        the ledger before its job is submitted, and its job id right after, so a killed driver's
        server is found (see ``ModelServer.start``)."""
        for role in self.roles_served():
            cfg = self.models[role]
            key = hashlib.sha256(f"{cfg.model}|{OmegaConf.to_yaml(cfg.serve)}".encode()).hexdigest()[:12]
            server = self._by_key.get(key)
            if server is None:
                server = ModelServer(cfg.model, cfg.serve, self.scheduler, self.folder / key)
                record = partial(_record, ledger, server_meta(key))
                if not server.resume(saved_record(ledger.get_meta(server_meta(key))), record):
                    server.start(record)
                self._by_key[key] = server
            llm = self.llm_of(role)
            assert isinstance(llm, RetryingLLM) and server.url  # serve.enabled is for openai_compatible
            llm.point_at(server.url)
            llm.check_model()

    def stop(self, ledger: Ledger, *, keep_alive: bool = False) -> None:
        """Cancel the run's model servers (a no-op when there are none, or they are stopped already);
        with ``keep_alive`` (between epochs), those with ``serve.keep_alive`` stay up."""
        for key, server in list(self._by_key.items()):
            if keep_alive and server.cfg.keep_alive:
                continue
            server.stop()
            ledger.set_meta(server_meta(key), None)
            del self._by_key[key]

    def running(self) -> bool:
        return bool(self._by_key)
