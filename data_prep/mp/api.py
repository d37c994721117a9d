"""Talking to the Materials Project through mp-api: API key, retries, batched REST calls, DOS store.

Everything that touches the network lives here; ``data_prep.mp.fetch`` only sees plain dicts and
pymatgen objects. The REST calls go through the public ``MPRester`` search methods
(``materials.summary``, ``materials.electronic_structure``, ``materials.oxidation_states``,
``materials`` core). The projected DOS comes from the object store the way mp-api 0.46.2+ reads it
(``DosRester.get_dos_from_task_id``): two Delta Lake tables in the public bucket
``materialsproject-parsed`` (``core/electronic-structure/total-dos/`` and ``.../projected-dos/``),
partitioned by run type, queried by the task's ``AlphaID`` identifier and run type through mp-api's
own table registration (``_get_delta_table``) and converted with emmet's ``ElectronicDos`` — see
``DeltaDosStore`` for why it does not call ``get_dos_from_task_id`` itself. ``check_mp_api`` turns
an mp-api without that reader into one line.

Errors: ``classify`` says whether a retry can help; ``short_reason`` turns mp-api, urllib3 and
object_store (Delta reader) errors into one plain line with the HTTP status, request and host
(``http_facts``), and says when a 403 is a web page (a proxy, a firewall) rather than the API's
answer: only the API's own 401/403 is reported as a rejected key.

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
                   "timeout", "connection refused", "connection reset", "temporarily unavailable",
                   "broken pipe", "chunkedencodingerror", "incompleteread", "error sending request",
                   "dns error", "failed to lookup address", "tcp connect error")
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
#: mp-api's message for a REST answer that is not 200 (``BaseRester._submit_request_and_process``)
_REST_ERROR = re.compile(r"status code (\d{3}) on URL (\S+) with message:\s*(.*)", re.S)
#: urllib3's RetryError as mp-api re-raises it (429/502/504 are retried by mp-api's own session)
_POOL_ERROR = re.compile(r"HTTPS?ConnectionPool\(host='([^']*)', port=(\d+)\).*?url: (\S+)"
                         r"(?:.*?too many (\d{3}) error responses)?", re.S)
#: object_store's (the Delta reader's S3 client) message for an answer that is not 2xx
_STORE_ERROR = re.compile(r"Error performing (GET|HEAD|PUT|POST|DELETE|LIST) (\S+) in .*?status code:?\s*"
                          r"(\d{3})\s*([A-Za-z][A-Za-z ]*?)?(?::\s*|\s+|$)(.*)", re.S)
_STORE_NET = re.compile(r"Error performing (GET|HEAD|PUT|POST|DELETE|LIST) (\S+)")


def plain(text) -> str:
    """``text`` without terminal colour codes and tree arrows, on one line."""
    text = _ANSI.sub("", str(text)).replace("\u21b3", " ")
    return " ".join(text.split())


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        return parts.netloc or url
    except ValueError:
        return url


def _path(url: str) -> str:
    from urllib.parse import urlsplit

    try:
        return urlsplit(url).path or "/"
    except ValueError:
        return url


def _body_kind(body: str) -> tuple[str, str]:
    """``(kind, summary)`` of an error body: ``html`` (a web page: proxy, firewall, captive portal),
    ``s3`` (an S3 XML error), ``json`` / ``api`` (the API's own answer), ``empty`` or ``text``."""
    b = plain(body).strip()
    low = b.lower()
    if not b:
        return "empty", ""
    if low.startswith(("<html", "<!doctype", "<head", "<body")) or "<html" in low[:200]:
        title = re.search(r"<title>(.*?)</title>", b, re.I | re.S)
        return "html", (f"an HTML page ({title.group(1).strip()[:80]!r})" if title else "an HTML page")
    if "<error>" in low:
        code = re.search(r"<Code>(.*?)</Code>", b, re.I | re.S)
        msg = re.search(r"<Message>(.*?)</Message>", b, re.I | re.S)
        return "s3", " ".join(x for x in (code.group(1) if code else "", msg.group(1) if msg else "") if x)
    if b[:1] in "{[":
        return "json", b[:160]
    return "text", b[:160]


@dataclass
class HttpFacts:
    """What an exception says about one HTTP answer: where it came from and what it was."""

    service: str            # "api" (REST) or "store" (the DOS object store)
    status: int | None
    host: str
    path: str
    body_kind: str = "empty"
    body: str = ""
    method: str = "GET"

    def line(self) -> str:
        what = f"HTTP {self.status}" if self.status else "no answer"
        where = f"{self.method} {self.path} on {self.host}"
        tail = ""
        if self.body_kind == "html":
            who = "Materials Project API" if self.service == "api" else "object store"
            tail = f": {self.body}, not an answer of the {who} (a proxy or firewall?)"
        elif self.body_kind == "retried":
            tail = " (every retry of mp-api's session too)"
        elif self.body:
            tail = f": {self.body}"
        return f"{what} from {where}{tail}"


def http_facts(exc: BaseException) -> HttpFacts | None:
    """Status, host, request and body kind from an mp-api, urllib3 or object_store error, if it names them."""
    text = plain(exc)
    m = _REST_ERROR.search(text)
    if m:
        body = m.group(3).strip()
        if body.startswith("Response "):  # mp-api's prefix for a body that is not the API's JSON
            kind, summary = _body_kind(body[len("Response "):])
        else:
            kind, summary = "api", plain(body)[:160]
        return HttpFacts("api", int(m.group(1)), _host(m.group(2)), _path(m.group(2)), kind, summary)
    m = _STORE_ERROR.search(text)
    if m:
        kind, summary = _body_kind(m.group(5))
        return HttpFacts("store", int(m.group(3)), _host(m.group(2)), _path(m.group(2)), kind, summary, m.group(1))
    m = _POOL_ERROR.search(text)
    if m:
        status = int(m.group(4)) if m.group(4) else None
        return HttpFacts("api", status, f"{m.group(1)}:{m.group(2)}", _path(m.group(3)),
                         "retried" if status else "empty")
    return None


def classify(exc: BaseException) -> str:
    """``"auth"``, ``"transient"`` or ``"permanent"`` for an exception raised by mp-api/requests/deltalake.

    ``auth`` only for the API's own 401/403 answer (its JSON body): a 403 page from a proxy, a
    firewall or the object store says nothing about the key.
    """
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
    facts = http_facts(exc)
    if facts is not None and facts.status:
        code = facts.status
        if code in (401, 403) and facts.service == "api" and facts.body_kind in ("api", "json", "empty"):
            return "auth"
        if code in (408, 429) or code >= 500:
            return "transient"
        return "permanent"
    low = plain(exc).lower()
    if any(t in low for t in _TRANSIENT_TEXT):
        return "transient"
    m = _STATUS.search(low)
    if m and int(m.group(1)) in (401, 403) and "rest query" in low:  # the API's answer, body unknown
        return "auth"
    if m:
        return "transient" if int(m.group(1)) in (408, 429) or int(m.group(1)) >= 500 else "permanent"
    return "permanent"


def failure_category(exc: BaseException) -> str:
    """Short label for the summary's 'failed by reason' table."""
    facts = http_facts(exc)
    code = facts.status if facts is not None else None
    if code is None:
        text = str(exc)
        m = _STATUS.search(text) or _TOO_MANY.search(text) or re.search(r"\bHTTP (\d{3}) from\b", text)
        code = int(m.group(1)) if m else None
    if code:
        return "rate-limited (HTTP 429)" if code == 429 else f"HTTP {code}"
    return "network" if classify(exc) == "transient" else "error"


def redact(text: str, key: str | None) -> str:
    """``text`` with every occurrence of the API key replaced by ``***``."""
    text = str(text)
    if key:
        text = text.replace(key, "***")
    return text


def short_reason(exc: BaseException, key: str | None = None, limit: int = 300) -> str:
    """One plain line describing ``exc``: status, host and request when it names an HTTP answer,
    the kind of network failure, else the first part of the message (colour codes removed)."""
    import requests

    if isinstance(exc, requests.exceptions.ConnectionError) and http_facts(exc) is None:
        msg = str(exc)
        for hint in ("Connection refused", "Name or service not known", "No route to host",
                     "Temporary failure in name resolution", "timed out", "Connection reset"):
            if hint in msg:
                return hint.lower()
        return "connection failed"
    if isinstance(exc, requests.exceptions.Timeout):
        return "timed out"
    facts = http_facts(exc)
    if facts is not None:
        line = facts.line()
    else:
        line = plain(exc)
        if "Error performing" in line and (m := _STORE_NET.search(line)):  # object store, no status
            low = line.lower()
            why = next((h for h in ("connection refused", "timed out", "connection reset", "dns error")
                        if h in low), "request failed")
            line = f"{why}: {m.group(1)} {_path(m.group(2))} on {_host(m.group(2))}"
    line = redact(line, key)
    return (line[: limit - 3] + "...") if len(line) > limit else (line or type(exc).__name__)


def signature(reason: str) -> str:
    """``reason`` with what varies between materials (file names, ids, numbers) blanked: equal
    signatures mean the same failure."""
    s = re.sub(r"part-[\w.-]+\.parquet", "<file>", str(reason))
    s = re.sub(r"\b(mp|mvc|task)-\w+", "<id>", s)
    s = re.sub(r"'[A-Za-z0-9_]+'", "'<v>'", s)
    s = re.sub(r"\d+(\.\d+)?", "#", s)
    return s


# ----------------------------------------------------------------------------- mp-api version
#: The mp-api release this fetcher was tested with (pyproject.toml pins it) and the oldest one
#: that has what it calls: 0.46.0 and 0.46.1 have no Delta-table DOS reader
#: (``QueryBuilderWithCache``, ``BaseRester._get_delta_table``), which arrived in 0.46.2.
MP_API_TESTED = "0.46.5"
MP_API_MIN = (0, 46, 2)
MP_API_BELOW = (0, 47, 0)


def _version_tuple(text: str) -> tuple[int, ...]:
    nums = []
    for part in str(text).split(".")[:3]:
        m = re.match(r"\d+", part)
        nums.append(int(m.group()) if m else 0)
    return tuple(nums + [0] * (3 - len(nums)))


def check_mp_api() -> str:
    """The installed mp-api version, or ``FetchError`` (one line) when it cannot serve this fetcher."""
    from importlib.metadata import PackageNotFoundError, version

    fix = f"install the tested release: pip install 'mp-api=={MP_API_TESTED}'"
    try:
        v = version("mp-api")
    except PackageNotFoundError:
        raise FetchError(f"mp-api is not installed; {fix}") from None
    if not MP_API_MIN <= _version_tuple(v) < MP_API_BELOW:
        low = ".".join(map(str, MP_API_MIN))
        high = ".".join(map(str, MP_API_BELOW))
        raise FetchError(f"mp-api {v} is not supported (this fetcher needs >= {low}, < {high}); {fix}")
    try:
        from mp_api.client import MPRester  # noqa: F401
        from mp_api.client.core.client import BaseRester, QueryBuilderWithCache  # noqa: F401

        if not hasattr(BaseRester, "_get_delta_table"):
            raise ImportError("BaseRester._get_delta_table")
        from emmet.core.band_theory import ElectronicDos  # noqa: F401
        from emmet.core.mpid import AlphaID  # noqa: F401
    except Exception as exc:
        raise FetchError(f"mp-api {v} lacks the Delta-table DOS reader this fetcher uses "
                         f"({type(exc).__name__}: {plain(exc)[:120]}); {fix}") from None
    return v


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

        self.mp_api_version = check_mp_api()
        from mp_api.client.core.client import QueryBuilderWithCache

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
    def dos_store(self) -> "DeltaDosStore":
        store = DeltaDosStore(self)
        store.open()
        return store


def dos_identifier(task_id: str) -> str:
    """The ``identifier`` column value of a task in MP's DOS tables (as mp-api 0.46 computes it)."""
    from emmet.core.mpid import AlphaID

    ident = str(AlphaID(str(task_id).split("-")[-1], padlen=8))
    if not re.fullmatch(r"[A-Za-z0-9_]+", ident):
        raise PermanentError(f"unexpected DOS identifier {ident!r} for task {task_id}")
    return ident


def run_type_value(run_type: str | None) -> str | None:
    """emmet's spelling of a run type (``RunType`` value: ``GGA``, ``GGA+U``, ``r2SCAN``), the
    value of the DOS tables' ``run_type`` partition column; None when unknown."""
    if not run_type:
        return None
    from emmet.core.vasp.calc_types.enums import RunType

    try:
        value = RunType(str(run_type)).value
    except ValueError:
        return None
    return value if re.fullmatch(r"[A-Za-z0-9_+\- ]+", value) else None


class DeltaDosStore:
    """The seam to MP's DOS object store (mp-api >= 0.46.2: Delta Lake tables on S3).

    Same tables, labels, identifier rule and row -> ``CompleteDos`` conversion as
    ``DosRester.get_dos_from_task_id(task_id, run_type, load_projections=True)``, with four
    differences that the fetcher needs:

    - the query names the DOS task's run type, the tables' partition column, as well as its
      identifier, so the reader opens one partition and, in it, only the files and row groups
      whose statistics admit the identifier (what a material costs in bytes is bounded);
    - the two tables are read by separate calls, so a failed projections read is retried without
      downloading the total DOS again (never two successful downloads of one kind);
    - results are streamed through pyarrow, which releases the GIL while the Delta engine waits
      on the network (mp-api's ``read_all`` holds it, which serialises every thread);
    - the tables are registered once, from one thread, before workers query them concurrently;
      a failed query is retried only when a retry can help (network, 429, 5xx), never for a
      schema or layout the query does not fit.
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

        def _guarded(kind):
            try:
                return _open(kind)
            except Exception as exc:
                kind_ = classify(exc)
                cls = TransientError if kind_ == "transient" else PermanentError
                raise cls(short_reason(exc, self.client._key)) from exc

        for kind in DOS_TABLES:
            try:
                self.labels[kind] = self.client._call(lambda k=kind: _guarded(k))
            except FetchError:
                raise
            except Exception as exc:
                bucket, prefix, _ = DOS_TABLES[kind]
                raise FetchError(f"cannot open the Materials Project DOS store s3://{bucket}/{prefix}: "
                                 f"{short_reason(exc, self.client._key)}") from None

    def query(self, kind: str, identifier: str, run_type: str | None) -> str:
        sql = f"SELECT * FROM {self.labels[kind]} WHERE identifier='{identifier}'"
        rt = run_type_value(run_type)
        if rt is not None:
            sql += f" AND run_type='{rt}'"
        return sql

    def rows(self, kind: str, identifier: str, run_type: str | None = None) -> list[dict]:
        """Rows of one table for one task identifier (one query). Transient failures raise
        ``TransientError`` (retried), others ``PermanentError`` (not retried)."""
        import pyarrow as pa

        sql = self.query(kind, identifier, run_type)
        qb = self.client.rester().materials.electronic_structure_dos.query_builder

        def _query():
            try:
                reader = qb.execute(sql)
                table = pa.RecordBatchReader.from_stream(reader).read_all()
            except Exception as exc:
                reason = f"DOS store ({DOS_TABLES[kind][2]}): {short_reason(exc, self.client._key)}"
                if classify(exc) == "transient":
                    raise TransientError(reason) from exc
                raise PermanentError(reason) from exc
            return table.to_pylist(maps_as_pydicts="strict")

        return self.client._call(_query)

    def total(self, task_id: str, run_type: str | None = None) -> list[dict]:
        return self.rows("total_dos", dos_identifier(task_id), run_type)

    def projections(self, task_id: str, run_type: str | None = None) -> list[dict]:
        return self.rows("projected_dos", dos_identifier(task_id), run_type)
