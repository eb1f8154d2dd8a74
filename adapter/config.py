"""Settings: defaults from config/default.toml, overridden by a TOML file, environment
variables (FHIR_RERANK_*) and explicit values, in that order. Nothing is read at import time.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = PROJECT_ROOT / "config" / "default.toml"
DEFAULT_FIXTURES = PROJECT_ROOT / "fhir_fixtures"
ENV_PREFIX = "FHIR_RERANK_"


@dataclass
class Settings:
    fhir_base_url: str = ""
    fhir_data: str = ""
    fhir_timeout: float = 30.0
    fhir_retries: int = 3
    fhir_backoff: float = 0.5
    fhir_max_pages: int = 50
    fhir_page_size: int = 200
    max_resources: int = 5000
    max_attachment_bytes: int = 1_000_000
    doc_cache_size: int = 10000
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str = ""
    default_count: int = 20
    max_count: int = 200
    require_patient: bool = True
    recall: int = 100
    max_recall: int = 1000
    reranker: str = "qwen3"
    model: str = "0.6B"
    models_allowed: list[str] = field(default_factory=lambda: ["0.6B"])
    device: str = "auto"
    dtype: str = "auto"
    max_length: int = 8192
    batch_tokens: int = 16384
    attention: str = "auto"
    cuda_graphs: bool = False
    instruction: str = ("Given a clinician's question about a patient, retrieve the parts of "
                        "the patient's record that answer it")
    reranker_required: bool = False
    allow_keyword_fallback: bool = False
    redis_url: str = ""
    sync_wait: float = 30.0
    result_expires: int = 3600
    task_soft_time_limit: int = 600
    task_time_limit: int = 660
    inprocess_workers: int = 2
    payload_key: str = ""
    state_dir: str = ""
    model_queues: list[str] = field(default_factory=list)
    broker_visibility_timeout: int = 3600
    redis_timeout: float = 2.0
    task_max_retries: int = 3
    # serving, limits, health and metrics (fhir-rerank serve)
    server_workers: int = 0
    server_threads: int = 8
    server_timeout: int = 120
    server_graceful_timeout: int = 30
    server_keepalive: int = 5
    server_request_timeout: float = 30.0
    forwarded_allow_ips: list[str] = field(default_factory=list)
    trusted_hosts: list[str] = field(default_factory=list)
    max_request_line: int = 8190
    max_header_count: int = 100
    max_header_bytes: int = 8190
    max_body_bytes: int = 1_000_000
    max_question_chars: int = 2000
    max_instruction_chars: int = 2000
    max_parameters: int = 100
    max_json_depth: int = 32
    readyz_timeout: float = 2.0
    log_format: str = "text"
    log_phi_at_debug: bool = False
    # keyword stage
    keyword_list_unmatched: bool = False
    # --- jobs: isolation, heartbeats, deadlines (issue 8) ---
    job_heartbeat_interval: float = 5.0
    job_stale_after: float = 20.0
    prepare_workers: int = 4
    max_finished_jobs: int = 256
    max_jobs_per_caller: int = 16
    max_sync_per_caller: int = 4
    upstream_deadline: float = 60.0
    # --- first stage: dense recall, time budget (issue 11: dense) ---
    embedder: str = ""
    embedder_instruction: str = ("Given a clinician's question about a patient, retrieve the "
                                 "parts of the patient's record that answer it")
    embedder_max_length: int = 8192
    rrf_k: int = 60
    rerank_budget_s: float = 0.0
    # --- rerank API, usage and cost, long documents, remote backend (issue 9) ---
    long_documents: str = "chunk"
    max_chunks_per_doc: int = 8
    overlap_tokens: int = 64
    prices_per_million_tokens: list[str] = field(
        default_factory=lambda: ["0.6B=0.01", "4B=0.02", "8B=0.04", "default=0.01"])
    api_keys: list[str] = field(default_factory=list)
    max_documents_per_call: int = 1000
    max_tokens_per_call: int = 2_000_000
    remote_url: str = ""
    remote_model: str = ""
    remote_api_key_env: str = "REMOTE_RERANK_API_KEY"
    remote_timeout: float = 60.0
    remote_retries: int = 4
    remote_backoff: float = 0.5
    remote_max_documents: int = 100
    # --- chart search, a SMART on FHIR app at /app/ (issue 19) ---
    smart_issuers: list[str] = field(default_factory=list)
    smart_client_id: str = "fhir-rerank-chart-search"
    smart_scopes: str = ("launch openid fhirUser patient/DocumentReference.rs "
                         "patient/Observation.rs patient/Condition.rs")
    smart_frame_ancestors: str = "'none'"
    smart_standin: bool = False
    smart_token_lifetime: int = 3600

    def data_dir(self) -> Path:
        return Path(self.fhir_data) if self.fhir_data else DEFAULT_FIXTURES


_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def default_config() -> Path:
    """config/default.toml of a checkout, or the copy an installed wheel carries in the package
    (`adapter/default.toml`, a link to it in the checkout): `pip install .` alone works."""
    return DEFAULT_CONFIG if DEFAULT_CONFIG.is_file() else Path(__file__).resolve().parent / \
        "default.toml"


def settings_env(overrides: Mapping[str, Any]) -> dict[str, str]:
    """FHIR_RERANK_* variables that give another process the settings `overrides` give
    `load_settings` here (lists comma-joined, booleans true/false; None values are not
    settings and are left out, as `load_settings` leaves them out)."""
    env: dict[str, str] = {}
    for name, value in overrides.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(str(v) for v in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env[ENV_PREFIX + name.upper()] = str(value)
    return env


def _coerce(name: str, value: Any, where: str = "") -> Any:
    """Turn an environment/TOML value into the type of the named setting (`where` names the
    variable in the error, e.g. FHIR_RERANK_PORT='eighty')."""
    if where:
        try:
            return _coerce(name, value)
        except ValueError as exc:
            raise ValueError(f"{where} (setting {name}): {str(exc).split(': ', 1)[1]}") \
                from None
    default = getattr(Settings(), name)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off", ""):
            return False
        raise ValueError(f"setting {name}: {value!r} is not a boolean (use true or false)")
    if isinstance(default, int):
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name}: {value!r} is not an integer") from None
    if isinstance(default, float):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {name}: {value!r} is not a number") from None
    if isinstance(default, list):
        if isinstance(value, list):
            return [str(v) for v in value]
        return [v.strip() for v in str(value).split(",") if v.strip()]
    return str(value)


def load_settings(overrides: Mapping[str, Any] | None = None,
                  env: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from the defaults file, FHIR_RERANK_CONFIG, the environment and overrides."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    files = [default_config()]
    if env.get(ENV_PREFIX + "CONFIG"):
        files.append(Path(env[ENV_PREFIX + "CONFIG"]))
        if not files[-1].is_file():
            raise ValueError(f"{ENV_PREFIX}CONFIG names {files[-1]}, which is not a file; fix the "
                             f"path or unset {ENV_PREFIX}CONFIG")
    chosen: set[str] = set()  # names set somewhere other than the defaults file
    for path in files:
        with path.open("rb") as fh:
            try:
                loaded = tomllib.load(fh)
            except tomllib.TOMLDecodeError as exc:
                raise ValueError(f"{path} is not valid TOML: {exc}") from None
        values.update(loaded)
        chosen |= set(loaded) if path != files[0] else set()
    known_env = {ENV_PREFIX + name.upper() for name in _FIELDS} | {ENV_PREFIX + "CONFIG"}
    stray = sorted(k for k in env if k.startswith(ENV_PREFIX) and k not in known_env)
    if stray:
        raise ValueError(f"unknown environment variable(s) {', '.join(_with_nearest(stray, known_env))}: "
                         "no such setting; see config/default.toml for the names "
                         "(FHIR_RERANK_<NAME>)")
    for name in _FIELDS:
        key = ENV_PREFIX + name.upper()
        if key in env:  # checked even when an override replaces it: bad config is bad
            values[name] = _coerce(name, env[key], f"{key}={env[key]!r}")
            chosen.add(name)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = value
            chosen.add(name)
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(_with_nearest(unknown, _FIELDS))}; "
                         "see config/default.toml")
    # `model` chosen (flag, environment, config file) and `models_allowed` left at its default:
    # the model chosen is the one allowed (`serve --model ./tiny` serves ./tiny and is ready
    # without a 0.6B it never loads).
    if "model" in chosen and "models_allowed" not in chosen and values.get("model"):
        values["models_allowed"] = [str(values["model"])]
    settings = Settings(**{name: _coerce(name, value) for name, value in values.items()})
    if settings.log_format not in ("text", "json"):
        raise ValueError(f"setting log_format: {settings.log_format!r} is not text or json")
    if not DEVICE_PATTERN.fullmatch(settings.device.strip()):
        raise ValueError(f"setting device: {settings.device!r} is not a device; use auto, cpu, "
                         "cuda, cuda:N (a GPU index) or mps")
    return settings


def looks_like_path(model: str) -> bool:
    """A `model` value written as a local path (./x, ../x, /x, ~/x, C:\\x, a/b/c) rather than a
    tier alias or a Hugging Face id (`owner/name`)."""
    text = model.strip()
    return (text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or text in (".", "..")
            or "\\" in text or text.count("/") > 1 or bool(re.match(r"[A-Za-z]:[\\/]", text)))


def check_model_paths(settings: Settings) -> None:
    """A model (or embedder) given as a local path that does not exist is an error now, naming
    the path, not a keyword-order fallback found later (the CLI and `serve` call this)."""
    if settings.reranker != "qwen3":
        names = [("embedder", settings.embedder)]
    else:
        names = [("model", m) for m in dict.fromkeys([settings.model, *settings.models_allowed])]
        names.append(("embedder", settings.embedder))
    for setting, value in names:
        if value.strip() and looks_like_path(value) and not Path(value).expanduser().exists():
            raise ValueError(f"{setting} {value!r} is a local path, and "
                             f"{Path(value).expanduser().absolute()} does not exist; give the directory that holds the checkpoint "
                             "(`fhir-rerank make-tiny-model DIR` writes a tiny random one), a "
                             "tier alias (0.6B, 4B, 8B) or a Hugging Face id")


DEVICE_PATTERN = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _with_nearest(names: list[str], known: Any) -> list[str]:
    """Each unknown name, with the known one it most likely misspells: `X (did you mean Y?)`."""
    out = []
    for name in names:
        near = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
        out.append(f"{name} (did you mean {near[0]}?)" if near else name)
    return out
