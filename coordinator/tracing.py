"""OpenTelemetry spans of a global transaction, when opentelemetry-api is installed.

The extra ``tracing`` installs it. Without it every function here is a no-op
that costs one flag test, so the commit path stays as cheap as before. With
it, twopc records:

* ``twopc.transaction``: one span per global transaction, from ``begin`` to
  its outcome (attributes ``twopc.gtrid``, ``twopc.outcome``), a child of
  whatever span was current at ``begin``;
* ``twopc.<phase>``: a child span per phase of the commit sequence
  (``prepare``, ``commit_point``, ``decision_log``, ``phase2``), the same
  phases as ``Transaction.timings``;
* a W3C ``traceparent`` header (and ``tracestate`` if any) on every message
  the transaction sends, so that a consumer continues the trace
  (:func:`continued`, :func:`continue_each`).

twopc never configures OpenTelemetry (no provider, no exporter): the
application does, as it does for logging, before it makes its coordinator.
Whether a tracer provider is set is decided once, when a coordinator is made
(:func:`decide`); until then, and without one, twopc makes no transaction or
phase spans and injects no headers: a transaction pays one flag test
(docs/design.md §2).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager, nullcontext
from typing import Any

try:
    from opentelemetry import propagate, trace
except ImportError:  # the 'tracing' extra is not installed
    ENABLED = False
else:
    ENABLED = True

TRACER_NAME = "twopc"
#: Whether transactions record spans: set by :func:`decide` (a coordinator, when it is made).
#: Once a provider is set it cannot be unset (OpenTelemetry sets it once per process).
RECORDING = False
#: The header every business message carries with its global transaction id.
GTRID_HEADER = "gtrid"


def _tracer() -> Any:
    return trace.get_tracer(TRACER_NAME)


def decide() -> bool:
    """Whether the application has set a tracer provider: asked once, when a coordinator
    is made, rather than per transaction; the answer is :data:`RECORDING`.

    A provider set after the coordinator was made is seen by the next coordinator made.
    """
    global RECORDING
    RECORDING = RECORDING or (
        ENABLED and not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    )
    return RECORDING


def start_transaction(gtrid: str) -> Any:
    """A started ``twopc.transaction`` span for ``gtrid``; None without OpenTelemetry, or
    while no coordinator has seen a tracer provider (the spans would record nothing)."""
    if not (ENABLED and RECORDING):
        return None
    return _tracer().start_span("twopc.transaction", attributes={"twopc.gtrid": gtrid})


def end_transaction(span: Any, outcome: str, reason: str = "") -> None:
    """End the transaction's span with its outcome (an error status unless committed)."""
    if span is None:
        return
    span.set_attribute("twopc.outcome", outcome)
    if outcome != "committed":
        span.set_status(trace.Status(trace.StatusCode.ERROR, reason or outcome))
    span.end()


def phase(span: Any, name: str) -> Any:
    """A context manager: the ``twopc.<name>`` child span of the transaction's ``span``."""
    if span is None:
        return nullcontext()
    return _tracer().start_as_current_span(f"twopc.{name}", context=trace.set_span_in_context(span))


def active(span: Any) -> Any:
    """A context manager making ``span`` the current span (for the message headers)."""
    if span is None:
        return nullcontext()
    return trace.use_span(span, end_on_exit=False)


def inject(headers: MutableMapping[str, str]) -> None:
    """Add ``traceparent`` (and ``tracestate``) of the current span to ``headers``; nothing
    while no tracer provider was seen (:func:`decide`)."""
    if ENABLED and RECORDING:
        propagate.inject(headers)


def continue_each(name: str, messages: Iterable[Mapping[str, str]], **attributes: str) -> list[Any]:
    """One started span ``name`` per received message's headers, each continuing its trace
    (for a batch applied together); end them with :func:`end_all`."""
    if not ENABLED:
        return []
    tracer = _tracer()
    return [
        tracer.start_span(
            name,
            context=propagate.extract(dict(headers)),
            attributes={**attributes, "twopc.gtrid": headers.get(GTRID_HEADER, "")},
        )
        for headers in messages
    ]


def end_all(spans: Iterable[Any]) -> None:
    for span in spans:
        span.end()


@contextmanager
def continued(name: str, headers: Mapping[str, str], **attributes: str) -> Iterator[Any]:
    """A span ``name`` continuing the trace of a received message's ``traceparent``."""
    if not ENABLED:
        yield None
        return
    parent = propagate.extract(dict(headers))
    attributes = {**attributes, "twopc.gtrid": headers.get(GTRID_HEADER, "")}
    with _tracer().start_as_current_span(name, context=parent, attributes=attributes) as span:
        yield span
