"""The ``connito.analysis/1`` record (``analysis.json``) as one typed class: :class:`AnalysisRecord`.

``connito analyze`` writes it (:meth:`AnalysisRecord.save`), every method that picks experts from an analysis reads
it (:meth:`AnalysisRecord.load`, through :func:`connito.analysis.expert_scores.load_analysis`), by attribute:
``analysis.model.moe_layers``, ``analysis.data.usable``, ``analysis.esft.gate_score``, ``analysis.drivers.score``.
The sections the report alone reads (concentration, specialisation, domain experts, co-activation, top-k overlap,
sufficiency, reweighting) stay the JSON they are (their layout is in :mod:`connito.analysis.report`).

The file on disk is unchanged by this class: :meth:`AnalysisRecord.to_dict` gives the same keys in the same order
as the writer always wrote, so analyses written before it still load and new ones read the same. A record handed
in as a plain dict (the Python API, tests) becomes an :class:`AnalysisRecord` through :func:`as_analysis`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from connito.common.atomic import atomic_write_json
from connito.common.records import check_schema, read_json_record

SCHEMA = "connito.analysis/1"
FILE = "analysis.json"
FIX = (
    "run `connito analyze model_path=<checkpoint or run directory>` and point analysis_path= at the analysis.json it "
    "writes (or the directory holding it)"
)


class AnalysisError(ValueError):
    """An analysis file Connito cannot use; the message names the file and the fix."""


@dataclass(frozen=True)
class AnalysedModel:
    """The ``model`` section: which checkpoint was analysed."""

    fingerprint: str
    model_type: str
    num_layers: int
    moe_layers: tuple[int, ...]
    num_experts: int
    top_k: int | None = None
    path: str | None = None
    """Where the model was when analysed (informational)."""

    def to_dict(self) -> dict:
        return {"path": self.path, "fingerprint": self.fingerprint, "model_type": self.model_type,
                "num_layers": self.num_layers, "moe_layers": list(self.moe_layers), "num_experts": self.num_experts,
                "top_k": self.top_k}  # fmt: skip


@dataclass(frozen=True)
class AnalysedData:
    """The ``data`` section: the domains measured and on how many routed tokens."""

    domains: tuple[str, ...]
    tokens: Mapping[str, int]
    usable: Mapping[str, bool]
    """Whether a domain reached ``min_tokens`` (its ESFT scores are 0 otherwise)."""
    split: str | None = None

    @property
    def usable_domains(self) -> list[str]:
        return [d for d in self.domains if self.usable.get(d)]

    def to_dict(self) -> dict:
        return {"split": self.split, "domains": list(self.domains), "tokens": dict(self.tokens),
                "usable": dict(self.usable)}  # fmt: skip


@dataclass(frozen=True)
class EsftScores:
    """ESFT's scores per domain, ``[MoE layer][expert]`` each, every layer summing to 1."""

    gate_score: Mapping[str, list]
    selection_ratio: Mapping[str, list]

    def to_dict(self) -> dict:
        return {"gate_score": dict(self.gate_score), "selection_ratio": dict(self.selection_ratio)}


@dataclass(frozen=True)
class DriverScores:
    """The causal driver scan: ``score`` / ``importance`` ``{domain: [MoE layer][expert]}``, ``tokens`` and
    ``loss`` per domain."""

    tokens: Mapping[str, int]
    score: Mapping[str, list]
    factor_up: float | None = None
    factor_down: float | None = None
    loss: Mapping[str, Any] | None = None
    importance: Mapping[str, list] | None = None

    def to_dict(self) -> dict:
        return {"factor_up": self.factor_up, "factor_down": self.factor_down, "tokens": dict(self.tokens),
                "loss": self.loss, "score": dict(self.score), "importance": self.importance}  # fmt: skip


_SECTIONS = ("router_score", "concentration", "specialisation", "domain_experts", "coactivation", "topk_overlap")
_LATE = ("sufficiency", "reweighting")
_NEEDED = {
    "model": ("fingerprint", "model_type", "num_layers", "moe_layers", "num_experts"),
    "data": ("domains", "tokens", "usable"),
    "esft": ("gate_score", "selection_ratio"),
}
_DRIVER_KEYS = ("tokens", "score")
_DRIVER_OPTIONAL = ("factor_up", "factor_down", "loss", "importance")


@dataclass(frozen=True)
class AnalysisRecord:
    """One ``analysis.json``. Sections a file lacks (an analysis written by hand or by an older Connito with fewer
    of them) are None; :attr:`path` is where it was read from (None for a record built in memory)."""

    model: AnalysedModel
    data: AnalysedData
    esft: EsftScores
    drivers: DriverScores | None = None
    router_score: Mapping[str, list] | None = None
    concentration: Mapping[str, Any] | None = None
    specialisation: list | None = None
    domain_experts: Mapping[str, Any] | None = None
    coactivation: list | None = None
    """``[MoE layer][i][j]``: P(j in a token's top-k | i in it)."""
    topk_overlap: Mapping[str, Any] | None = None
    sufficiency: Mapping[str, Any] | None = None
    reweighting: Mapping[str, Any] | None = None
    path: Path | None = field(default=None, compare=False)

    # -- JSON ----------------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The ``analysis.json`` object, keys in the writer's order."""
        record: dict[str, Any] = {"schema": SCHEMA, "model": self.model.to_dict(), "data": self.data.to_dict(),
                                  "esft": self.esft.to_dict()}  # fmt: skip
        for name in _SECTIONS:
            record[name] = getattr(self, name)
        record["drivers"] = None if self.drivers is None else self.drivers.to_dict()
        for name in _LATE:
            record[name] = getattr(self, name)
        return record

    @classmethod
    def from_dict(cls, record: Mapping, path: str | Path | None = None) -> AnalysisRecord:
        """The record of a parsed ``analysis.json``, checked for the schema and the sections readers need."""
        where = path if path is not None else "the analysis record"
        check_schema(record.get("schema"), where, SCHEMA, what="Connito analysis", fix=FIX, error=AnalysisError)
        for section, keys in _NEEDED.items():
            missing = [key for key in keys if key not in (record.get(section) or {})]
            if missing:
                raise AnalysisError(
                    f"{where}: section '{section}' lacks {missing}; re-run `connito analyze` to rewrite it"
                )
        drivers = record.get("drivers")
        if drivers is not None:
            missing = [key for key in _DRIVER_KEYS if key not in drivers]
            if missing:
                raise AnalysisError(
                    f"{where}: section 'drivers' lacks {missing}; re-run `connito analyze` to rewrite it"
                )
        model, data, esft = record["model"], record["data"], record["esft"]
        return cls(
            model=AnalysedModel(
                fingerprint=model["fingerprint"],
                model_type=model["model_type"],
                num_layers=int(model["num_layers"]),
                moe_layers=tuple(int(layer) for layer in model["moe_layers"]),
                num_experts=int(model["num_experts"]),
                top_k=None if model.get("top_k") is None else int(model["top_k"]),
                path=model.get("path"),
            ),
            data=AnalysedData(tuple(data["domains"]), dict(data["tokens"]), dict(data["usable"]), data.get("split")),
            esft=EsftScores(dict(esft["gate_score"]), dict(esft["selection_ratio"])),
            drivers=None
            if drivers is None
            else DriverScores(
                dict(drivers["tokens"]), dict(drivers["score"]), **{key: drivers.get(key) for key in _DRIVER_OPTIONAL}
            ),
            **{name: record.get(name) for name in (*_SECTIONS, *_LATE)},
            path=None if path is None else Path(path),
        )

    # -- files ---------------------------------------------------------------------------------------------------

    @staticmethod
    def file(path: str | Path) -> Path:
        """``path`` itself, or ``path/analysis.json`` when ``path`` is a directory."""
        path = Path(path).expanduser()
        return path / FILE if path.is_dir() else path

    @classmethod
    def load(cls, path: str | Path, error: type[Exception] = AnalysisError) -> AnalysisRecord:
        """The ``analysis.json`` at ``path`` (the file or its directory); ``error`` is the caller's error class
        for a file that is absent, unreadable or of another schema or version."""
        file = cls.file(path)
        if not file.is_file():
            raise error(
                f"no analysis.json at {file}: run `connito analyze model_path=<checkpoint or run directory>` first, or "
                "point analysis_path= at the file or the directory holding it"
            )
        record = read_json_record(file, SCHEMA, what="Connito analysis", fix=FIX, error=error)
        try:
            return cls.from_dict(record, file)
        except AnalysisError as err:
            raise error(str(err)) from None

    def save(self, path: str | Path) -> Path:
        """Write ``analysis.json`` to ``path`` (a file path) atomically; returns ``path``."""
        return atomic_write_json(Path(path).expanduser(), self.to_dict())


def as_analysis(analysis: AnalysisRecord | Mapping) -> AnalysisRecord:
    """``analysis`` as an :class:`AnalysisRecord` (a parsed ``analysis.json`` dict is checked and converted)."""
    return analysis if isinstance(analysis, AnalysisRecord) else AnalysisRecord.from_dict(analysis)
