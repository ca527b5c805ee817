"""OpenTelemetry: a span per global transaction and per phase, traceparent and gtrid on every
message the transaction sends, and both consumers continuing the sender's trace."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from coordinator import tracing
from scenarios.config import Settings
from scenarios.outbox.consumer import Consumer
from scenarios.outbox.consumer_2pc import TwoPhaseConsumer
from scenarios.outbox.deadletter import dead_letter_queue
from scenarios.transfer import model as scenario
from scenarios.transfer.model import CREDIT_QUEUE
from scenarios.wiring import open_coordinator
from tests.test_dead_letters import Running, browse, credit, private_queue, put
from tests.test_driver import World, transfer
from tests.test_outbox import fresh, wait_for

__all__ = ["private_queue"]  # the fixture, imported for this module's tests

_EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans recorded in memory (the global provider is set once per process)."""
    if not isinstance(trace.get_tracer_provider(), TracerProvider):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(_EXPORTER))
        trace.set_tracer_provider(provider)
    yield _EXPORTER


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def traceparent(span: trace.Span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-"


@pytest.mark.lab
def test_a_transaction_is_a_span_with_its_phases_and_its_messages_carry_the_trace(
    settings: Settings, spans: InMemorySpanExporter, private_queue: str
) -> None:
    """The transaction's span is a child of the caller's, each phase a child of it, and the
    message it sent carries its gtrid and a traceparent naming the transaction's span."""
    for dsn in (settings.pg_a, settings.pg_b):
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS tracing_probe (x int)")
    spans.clear()
    coordinator = open_coordinator(settings, sessions=2)
    try:
        with (
            trace.get_tracer("test").start_as_current_span("request") as request,
            coordinator.transaction() as tx,
        ):
            tx.execute("a", "INSERT INTO tracing_probe VALUES (1)")
            tx.execute("b", "INSERT INTO tracing_probe VALUES (1)")
            tx.send(private_queue, "{}", {"kind": "test"})
    finally:
        coordinator.close()
    [span] = named(spans, "twopc.transaction")
    assert span.attributes is not None and span.attributes["twopc.gtrid"] == tx.gtrid
    assert span.attributes["twopc.outcome"] == "committed"
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    phases = {
        s.name
        for s in spans.get_finished_spans()
        if s.parent is not None and s.parent.span_id == span.context.span_id
    }
    assert {"twopc.prepare", "twopc.commit_point", "twopc.decision_log", "twopc.phase2"} <= phases
    [message] = browse(settings, private_queue)
    assert message.headers["gtrid"] == tx.gtrid
    assert message.headers["kind"] == "test"
    expected = f"00-{span.context.trace_id:032x}-{span.context.span_id:016x}-"
    assert message.headers["traceparent"].startswith(expected)


@pytest.fixture
def credit_queue(settings: Settings) -> Iterator[None]:
    """A fresh lab; the credit queue and its dead letters drained afterwards."""
    fresh(settings)
    yield
    scenario.drain(settings, CREDIT_QUEUE)
    scenario.drain(settings, dead_letter_queue(CREDIT_QUEUE))


def sent_with_trace(settings: Settings, tid: str) -> trace.Span:
    """A credit command sent inside a span of the test's own (the sender's trace)."""
    with trace.get_tracer("test").start_as_current_span("sender") as sender:
        body, headers = credit(tid)
        propagate.inject(headers)
        assert headers["traceparent"].startswith(traceparent(sender))
        put(settings, CREDIT_QUEUE, [(body, headers)])
    return sender


@pytest.mark.lab
def test_the_inbox_consumer_continues_the_senders_trace(
    settings: Settings, spans: InMemorySpanExporter, credit_queue: None
) -> None:
    """The inbox consumer's span for a message is a child of the sender's span."""
    spans.clear()
    sender = sent_with_trace(settings, "traced-1")
    consumer = Consumer(settings)
    with Running(consumer):  # type: ignore[arg-type]
        wait_for(lambda: consumer.stats.applied == 1, 30, "the credit applied")
    [consumed] = named(spans, "twopc.consume")
    assert consumed.parent is not None
    assert consumed.parent.span_id == sender.get_span_context().span_id
    assert consumed.context.trace_id == sender.get_span_context().trace_id


@pytest.mark.lab
def test_the_2pc_consumer_continues_the_trace_into_its_global_transaction(
    settings: Settings, spans: InMemorySpanExporter, credit_queue: None
) -> None:
    """The 2pc consumer's span is a child of the sender's, and the global transaction that
    credits B a child of that span: one trace from the sender to B's commit."""
    spans.clear()
    sender = sent_with_trace(settings, "traced-2")
    consumer = TwoPhaseConsumer(settings)
    with Running(consumer):  # type: ignore[arg-type]
        wait_for(lambda: consumer.stats.applied == 1, 30, "the credit applied")
    [consumed] = named(spans, "twopc.consume")
    assert consumed.parent is not None
    assert consumed.parent.span_id == sender.get_span_context().span_id
    applied = [
        s
        for s in named(spans, "twopc.transaction")
        if s.parent is not None and s.parent.span_id == consumed.context.span_id
    ]
    assert len(applied) == 1
    assert applied[0].context.trace_id == sender.get_span_context().trace_id


def test_without_opentelemetry_every_call_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """With tracing off (no API installed), no span is made and no header is added."""
    monkeypatch.setattr(tracing, "ENABLED", False)
    assert tracing.start_transaction("twopc.x") is None
    headers = {"gtrid": "twopc.x"}
    tracing.inject(headers)
    assert headers == {"gtrid": "twopc.x"}
    assert tracing.continue_each("twopc.consume", [{"traceparent": "00-1-2-01"}]) == []
    with tracing.continued("twopc.consume", {}) as span, tracing.phase(None, "prepare"):
        assert span is None


def test_without_a_tracer_provider_a_transaction_asks_opentelemetry_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without a provider, the coordinator asks for one once, when it is made; its
    transactions then call neither get_tracer_provider nor propagate.inject."""
    asked: list[str] = []

    def no_provider() -> trace.TracerProvider:
        asked.append("get_tracer_provider")
        return trace.ProxyTracerProvider()

    def inject(*args: object, **kwargs: object) -> None:
        asked.append("inject")

    monkeypatch.setattr(tracing, "RECORDING", False)
    monkeypatch.setattr(tracing.trace, "get_tracer_provider", no_provider)
    monkeypatch.setattr(tracing.propagate, "inject", inject)
    world = World()
    coordinator = world.coordinator()
    for _ in range(5):
        with coordinator.transaction() as tx:
            transfer()(tx)
    coordinator.close()
    assert asked == ["get_tracer_provider"]
    assert tx.span is None
