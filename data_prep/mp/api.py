"""Talking to the Materials Project through mp-api: API key, retries, batched REST calls, DOS store.

Everything that touches the network lives here; ``data_prep.mp.fetch`` only sees plain dicts and
pymatgen objects. The REST calls go through the public ``MPRester`` search methods
(``materials.summary``, ``materials.electronic_structure``, ``materials.oxidation_states``,
``materials`` core). The projected DOS comes from the object store the way mp-api 0.46 reads it
(``DosRester.get_dos_from_task_id``): two Delta Lake tables in the public bucket
``materialsproject-parsed`` (``core/electronic-structure/total-dos/`` and ``.../projected-dos/``),
queried by the task's ``AlphaID`` identifier through mp-api's own table registration
(``_get_delta_table``) and converted with emmet's ``ElectronicDos`` — see ``DeltaDosStore`` for why
it does not call ``get_dos_from_task_id`` itself.

The API key is passed to mp-api and otherwise never leaves this module: every message that can
reach a user goes through ``redact``.
"""
from __future__ import annotations

import os
import random
import re
import threading
import time
from dataclasses import dataclass, field

#: Environment variable mp-api reads first; pymatgen's setting is the fallback.
KEY_ENV = "MP_API_KEY"
PMG_KEY_SETTING = "PMG_MAPI_KEY"
DEFAULT_ENDPOINT = "https://api.materialsproject.org/"

#: Where mp-api 0.46 keeps the DOS (bucket, prefix, label it registers the table under).
DOS_TABLES = {
    "total_dos": ("materialsproject-parsed", "core/electronic-structure/total-dos/", "total_dos"),
    "projected_dos": ("materialsproject-parsed", "core/electronic-structure/projected-dos/", "dos_projections"),
}


# ----------------------------------------------------------------------------- errors
class FetchError(Exception):
    """Stops the whole fetch (no key, key rejected, endpoint unreachable); one line for the user."""


class AuthError(FetchError):
    """The API answered 401/403."""


class TransientError(Exception):
    """A request that may succeed when repeated (timeout, dropped connection, 429, 5xx)."""


class PermanentError(Exception):
    """A request that will not succeed when repeated (4xx other than 401/403/429, bad data)."""


_STATUS = re.compile(r"status code (\d{3})")
_TOO_MANY = re.compile(r"too many (\d{3}) error responses")
_TRANSIENT_TEXT = ("max retries exceeded", "connection aborted", "remotedisconnected", "timed out",
                   "timeout", "connection refused", "connection reset", "failed to retrieve object",
                   "temporarily unavailable", "broken pipe", "too many", "chunkedencodingerror",
                   "incompleteread", "error sending request", "generic s3 error", "io error")


def classify(exc: BaseException) -> str:
    """``"auth"``, ``"transient"`` or ``"permanent"`` for an exception raised by mp-api/requests/deltalake."""
    import requests

    if isinstance(exc, AuthError):
        return "auth"
    if isinstance(exc, TransientError):
        return "transient"
    if isinstance(exc, PermanentError):
        return "permanent"
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout,
                        requests.exceptions.ChunkedEncodingError, ConnectionError, TimeoutError)):
        return "transient"
    text = str(exc)
    m = _STATUS.search(text)
    if m:
        code = int(m.group(1))
        if code in (401, 403):
            return "auth"
        if code == 429 or code >= 500:
            return "transient"
        return "permanent"
    low = text.lower()
    if any(t in low for t in _TRANSIENT_TEXT):
        return "transient"
    return "permanent"


def failure_category(exc: BaseException) -> str:
    """Short label for the summary's 'failed by reason' table."""
    text = str(exc)
    m = _STATUS.search(text) or _TOO_MANY.search(text)
    if m:
        code = int(m.group(1))
        return "rate-limited (HTTP 429)" if code == 429 else f"HTTP {code}"
    return "network" if classify(exc) == "transient" else "error"


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of the API key replaced by ``***``."""
    text = str(text)
    if key:
        text = text.replace(key, "***")
    return text


def short_reason(exc: BaseException, key: str | None = None, limit: int = 300) -> str:
    """One line describing ``exc`` (type name for network errors, first line of the message)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError):
        msg = str(exc)
        for hint in ("Connection refused", "Name or service not known", "No route to host",
                     "Temporary failure in name resolution", "timed out", "Connection reset"):
            if hint in msg:
                return hint.lower()
        return "connection failed"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    line = " ".join(str(exc).split())
    line = redact(line, key)
    return (line[: limit - 3] + "...") if len(line) > limit else (line or type(exc).__name__)


# ----------------------------------------------------------------------------- key
def resolve_api_key() -> tuple[str, str]:
    """``(key, where)`` from ``MP_API_KEY`` or pymatgen's ``PMG_MAPI_KEY`` (env or ~/.config/.pmgrc.yaml).

    The same places ``MPRester`` looks. Raises ``FetchError`` when neither is set.
    """
    key = os.environ.get(KEY_ENV, "").strip()
    if key:
        return key, KEY_ENV
    try:
        from pymatgen.core import SETTINGS

        key = str(SETTINGS.get(PMG_KEY_SETTING) or "").strip()
    except Exception:  # a broken .pmgrc.yaml must not hide the real message
        key = ""
    if key:
        return key, PMG_KEY_SETTING
    raise FetchError(f"no Materials Project API key: set {KEY_ENV} (export {KEY_ENV}=...) or "
                     f"{PMG_KEY_SETTING} in pymatgen's settings (~/.config/.pmgrc.yaml); "
                     "get a key at https://materialsproject.org/api")


# ----------------------------------------------------------------------------- retries
@dataclass
class RetryPolicy:
    """Exponential backoff with jitter: attempt k waits ``min(max_s, base_s * 2**(k-1)) * U(0.5, 1.5)``."""

    attempts: int = 6
    base_s: float = 1.0
    max_s: float = 60.0
    retries: int = 0                       # retries done (all threads), for the summary
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def delay_s(self, attempt: int) -> float:
        return min(self.max_s, self.base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)

    def call(self, fn, stop: threading.Event | None = None):
        """``fn()``, repeated on transient errors; auth errors become ``AuthError`` at once."""
        for attempt in range(1, max(1, self.attempts) + 1):
            try:
                return fn()
            except Exception as exc:
                kind = classify(exc)
                if kind == "auth":
                    m = _STATUS.search(str(exc))
                    code = m.group(1) if m else "401/403"
                    raise AuthError(f"the Materials Project rejected the API key (HTTP {code}): check "
                                    f"{KEY_ENV} or {PMG_KEY_SETTING}") from None
                if kind == "permanent" or attempt >= self.attempts:
                    raise
                with self._lock:
                    self.retries += 1
                wait = self.delay_s(attempt)
                if stop is not None:
                    if stop.wait(wait):
                        raise
                else:
                    time.sleep(wait)
        raise AssertionError("unreachable")


# ----------------------------------------------------------------------------- client
def canonical_id(material_id) -> str:
    """One spelling per material: emmet's legacy form (``mp-149``) of an MP id, whichever form came in.

    Documents may carry the numeric form or emmet's alphabetic ``AlphaID`` form (``mp-aaaaabmn``);
    both name the same material.
    """
    text = str(material_id)
    try:
        from emmet.core.mpid import AlphaID

        return str(AlphaID(text).string)
    except Exception:
        return text


def _natural_key(material_id: str):
    prefix, _, num = str(material_id).rpartition("-")
    return (prefix, int(num), "") if num.isdigit() else (prefix, 1 << 62, str(material_id))


def sort_ids(ids) -> list[str]:
    """Material ids in natural order (mp-2 < mp-10), others after, by string."""
    return sorted(set(ids), key=_natural_key)


class MPClient:
    """Thread-safe access to the MP API: one ``MPRester`` per thread, one shared Delta query builder.

    ``endpoint`` defaults to mp-api's own default (``MP_API_ENDPOINT`` or the public API). The DOS
    object store is the public S3 bucket unless the AWS/object_store environment
    (``AWS_ENDPOINT_URL``, ``AWS_ALLOW_HTTP``) points elsewhere — that is how the tests reach the
    local stand-in server.
    """

    def __init__(self, api_key: str, endpoint: str | None = None, policy: RetryPolicy | None = None,
                 stop: threading.Event | None = None):
        self._key = api_key
        # resolved now: mp-api reads MP_API_ENDPOINT once, when it is first imported
        self.endpoint = endpoint or os.environ.get("MP_API_ENDPOINT") or None
        self.policy = policy or RetryPolicy()
        self.stop = stop or threading.Event()
        self._local = threading.local()
        self._qb = None
        self.db_version = ""
        self.mp_api_version = ""

    # -- construction ----------------------------------------------------------------------
    def connect(self) -> None:
        """Create the first ``MPRester`` (heartbeat request); turn its failures into one-line errors."""
        import requests
        from mp_api.client.core.client import QueryBuilderWithCache

        try:
            from mp_api.client import __version__ as v
            self.mp_api_version = str(v)
        except Exception:
            pass
        self._qb = QueryBuilderWithCache()
        where = self.endpoint or DEFAULT_ENDPOINT
        try:
            mpr = self.rester()
        except requests.exceptions.RequestException as exc:
            raise FetchError(f"cannot reach the Materials Project API at {where}: "
                             f"{short_reason(exc, self._key)}") from None
        except Exception as exc:  # mp-api's own checks (key length, bad heartbeat)
            text = str(exc)
            if "API key" in text or "32 characters" in text:
                raise AuthError("mp-api rejected the API key before sending it (Materials Project keys "
                                f"are 32 characters): check {KEY_ENV} or {PMG_KEY_SETTING}") from None
            raise FetchError(f"cannot start mp-api against {where}: {short_reason(exc, self._key)}") from None
        self.db_version = str(getattr(mpr, "db_version", "") or "")

    def rester(self):
        """This thread's ``MPRester`` (created on first use)."""
        mpr = getattr(self._local, "mpr", None)
        if mpr is None:
            import warnings

            from mp_api.client import MPRester

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mpr = MPRester(api_key=self._key, endpoint=self.endpoint, use_document_model=False,
                               mute_progress_bars=True, query_builder=self._qb)
            self._local.mpr = mpr
        return mpr

    def _call(self, fn):
        return self.policy.call(fn, self.stop)

    # -- REST -------------------------------------------------------------------------------
    def select(self, filters: dict) -> list[dict]:
        """Summary documents (light fields) of every material matching ``filters`` with a DOS."""
        fields = ["material_id", "formula_pretty", "nsites", "nelements", "energy_above_hull",
                  "is_stable", "theoretical"]
        kwargs = dict(filters)
        kwargs["has_props"] = sorted(set(kwargs.get("has_props") or []) | {"dos"})
        docs = self._call(lambda: self.rester().materials.summary.search(fields=fields, **kwargs))
        return [{**dict(d), "material_id": canonical_id(d["material_id"])} for d in docs]

    def electronic_structure(self, ids: list[str]) -> dict[str, dict]:
        fields = ["material_id", "band_gap", "efermi", "is_metal", "dos"]
        docs = self._call(lambda: self.rester().materials.electronic_structure.search(
            material_ids=ids, fields=fields, chunk_size=max(len(ids), 1)))
        return {canonical_id(d["material_id"]): dict(d) for d in docs}

    def oxidation_states(self, ids: list[str]) -> dict[str, dict]:
        fields = ["material_id", "structure", "possible_species", "possible_valences",
                  "average_oxidation_states", "method"]
        docs = self._call(lambda: self.rester().materials.oxidation_states.search(
            material_ids=ids, fields=fields, chunk_size=max(len(ids), 1)))
        return {canonical_id(d["material_id"]): dict(d) for d in docs}

    def calc_types(self, ids: list[str]) -> dict[str, dict]:
        docs = self._call(lambda: self.rester().materials.search(
            material_ids=ids, fields=["material_id", "calc_types"], chunk_size=max(len(ids), 1)))
        return {canonical_id(d["material_id"]): dict(d.get("calc_types") or {}) for d in docs}

    # -- DOS --------------------------------------------------------------------------------
    def dos_store(self) -> "DeltaDosStore | PublicDosStore":
        dos_rester = self.rester().materials.electronic_structure_dos
        if hasattr(dos_rester, "_get_delta_table") and hasattr(dos_rester, "query_builder"):
            store = DeltaDosStore(self)
        else:  # mp-api < 0.46 kept the DOS as one JSON object per task: its public method suffices
            store = PublicDosStore(self)
        store.open()
        return store


def dos_identifier(task_id: str) -> str:
    """The ``identifier`` column value of a task in MP's DOS tables (as mp-api 0.46 computes it)."""
    from emmet.core.mpid import AlphaID

    ident = str(AlphaID(str(task_id).split("-")[-1], padlen=8))
    if not re.fullmatch(r"[A-Za-z0-9_]+", ident):
        raise PermanentError(f"unexpected DOS identifier {ident!r} for task {task_id}")
    return ident


class DeltaDosStore:
    """The seam to MP's DOS object store (mp-api >= 0.46: Delta Lake tables on S3).

    Same tables, labels, identifier rule and row -> ``CompleteDos`` conversion as
    ``DosRester.get_dos_from_task_id(task_id, load_projections=True)``, with three differences
    that the fetcher needs:

    - the two tables are read by separate calls, so a failed projections read is retried without
      downloading the total DOS again (never two successful downloads of one kind);
    - results are streamed through pyarrow, which releases the GIL while the Delta engine waits
      on the network (mp-api's ``read_all`` holds it, which serialises every thread);
    - the tables are registered once, from one thread, before workers query them concurrently.
    """

    def __init__(self, client: MPClient):
        self.client = client
        self.labels: dict[str, str] = {}

    def open(self) -> None:
        def _open(kind):
            bucket, prefix, label = DOS_TABLES[kind]
            rester = self.client.rester().materials.electronic_structure_dos
            lbl, _table = rester._get_delta_table(bucket, prefix, label=label)
            return lbl

        for kind in DOS_TABLES:
            try:
                self.labels[kind] = self.client._call(lambda k=kind: _open(k))
            except FetchError:
                raise
            except Exception as exc:
                bucket, prefix, _ = DOS_TABLES[kind]
                raise FetchError(f"cannot open the Materials Project DOS store s3://{bucket}/{prefix}: "
                                 f"{short_reason(exc, self.client._key)}") from None

    def rows(self, kind: str, identifier: str) -> list[dict]:
        """Rows of one table for one task identifier (one query; transient failures raise TransientError)."""
        import pyarrow as pa

        sql = f"SELECT * FROM {self.labels[kind]} WHERE identifier='{identifier}'"
        qb = self.client.rester().materials.electronic_structure_dos.query_builder

        def _query():
            try:
                reader = qb.execute(sql)
                table = pa.RecordBatchReader.from_stream(reader).read_all()
            except Exception as exc:
                raise TransientError(f"DOS store query failed: {short_reason(exc)}") from exc
            return table.to_pylist(maps_as_pydicts="strict")

        return self.client._call(_query)

    def total(self, task_id: str) -> list[dict]:
        return self.rows("total_dos", dos_identifier(task_id))

    def projections(self, task_id: str) -> list[dict]:
        return self.rows("projected_dos", dos_identifier(task_id))


class PublicDosStore:
    """Fallback for mp-api versions without Delta tables: ``get_dos_from_task_id`` as published.

    Not exercised by the offline tests (they run mp-api 0.46). One call returns total and
    projections together.
    """

    def __init__(self, client: MPClient):
        self.client = client

    def open(self) -> None:
        pass

    def complete_dos(self, task_id: str):
        import inspect

        def _get():
            r = self.client.rester().materials.electronic_structure_dos
            if "load_projections" in inspect.signature(r.get_dos_from_task_id).parameters:
                return r.get_dos_from_task_id(task_id, load_projections=True)
            return r.get_dos_from_task_id(task_id)

        return self.client._call(_get)
