"""What answers cost in dollars, and whether the next prompt fits the budget. Pure: no database, no network, no
clock (`now` is passed in); must not import google.genai, sqlalchemy or the settings.

Owns the price table (per model, USD per million tokens), the arithmetic that turns one answer's usage into
dollars for the token ledger, the upper-bound estimate of a prompt not yet sent, and the budget verdict.

Where the prices come from. The defaults below are the paid-tier prices of the Gemini Developer API's pricing page,
https://ai.google.dev/gemini-api/docs/pricing. That page itself could not be fetched from here; each entry was
taken from dated verbatim transcriptions of it (named in the entry's `via`, with the date the page was read in
`read_on`) and cross-checked between them where more than one existed. The general rules (Batch: 50 % off;
context-cache reads: 90 % off the input price) are Google's own words on
https://ai.google.dev/gemini-api/docs/optimization. Prices change: any entry can be overridden or added in the
configuration (`[prices."MODEL"]`), and a model this table does not know has no price (its cost is None, and
`status` says so) rather than a guessed one.

How one answer is priced (`cost`), from usageMetadata:
  * promptTokenCount (P) is the whole prompt, cached part included; promptTokensDetails gives its AUDIO share (A);
    the rest (P - A) is billed at the text/image/video input price.
  * cachedContentTokenCount (C) is part of P, not added to it: those C tokens are billed at the cached-input price
    *instead of* the input price, so fresh input = P - C, cached input = C (never P + C, never P at full price).
  * The cached tokens' AUDIO share comes from cacheTokensDetails when the API gives it. When it does not, it lies
    somewhere between max(0, C - (P - A)) (the cache holds all the text first) and min(C, A) (all audio first); the
    cost is linear in it, so the end that costs more is taken and the ledger never understates. With the published
    prices that is "text first"; for this project's prompts (hours of audio, a sentence of text) both ends are a
    few text tokens apart.
  * candidatesTokenCount and thoughtsTokenCount are both billed at the output price ("output price, including
    thinking tokens").
  * Long context: where the page prices prompts above a size differently (Gemini 2.5 Pro and 3 Pro above 200k
    tokens), a prompt with P > threshold pays the higher input, cached and output prices for the whole request;
    P == threshold is still the lower tier.
  * Batch API: input and output prices are halved (`batch_discount`). Cached reads keep the cached price: the two
    discounts are not assumed to stack (the higher reading; the Developer API page was not verified on this).
  * A model whose cached price is unknown bills its cached tokens as fresh input (no discount assumed).
  * Odd counts are clamped, never trusted to be consistent: A and C are at most P (P is raised to A if smaller).

The budget (`budget_check`): with `daily_budget_usd` / `monthly_budget_usd` set, a prompt may start a generation
call only if what was spent today (UTC) / this month plus the call's estimate stays at or under the limit; else it
waits, with a sentence for `status` and the time the window resets (the next UTC midnight, or the first of next
month). Nothing already spent is lost: answered chunks are kept and a waiting prompt resumes where it stopped.
`ask --force` sets `Prompt.force_budget`, a one-prompt exemption stored on the prompt: that prompt (all of its
calls) goes past the budget once, and no other prompt does.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Protocol

MILLION = Decimal(1_000_000)
LEDGER_PLACES = Decimal("0.000001")  # token_usage.cost_usd is Numeric(12, 6)
PRICING_URL = "https://ai.google.dev/gemini-api/docs/pricing"
LONG_CONTEXT_TOKENS = 200_000


def usd(value: Decimal | float | int | str) -> Decimal:
    """A price or amount as an exact Decimal; floats from TOML go through their shortest text (0.3 -> 0.3)."""
    return value if isinstance(value, Decimal) else Decimal(str(value))


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for one prompt-size tier. A cached price of None: no cache discount known."""

    input: Decimal  # text, image, video (and documents)
    audio_input: Decimal
    output: Decimal  # thinking tokens included
    cached_input: Decimal | None = None
    cached_audio: Decimal | None = None


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """One model's prices: `base` for prompts up to `long_context_above` tokens (or all), `long` above it."""

    model: str
    base: Rates
    long: Rates | None = None
    long_context_above: int | None = None
    batch_discount: Decimal = Decimal("0.5")
    read_on: date | None = None  # when the source page was read; None for a price from the configuration
    source: str = PRICING_URL
    via: str = ""  # the copies the numbers were taken from, and what is assumed

    def rates_for(self, prompt_tokens: int) -> Rates:
        if self.long is not None and self.long_context_above is not None and prompt_tokens > self.long_context_above:
            return self.long
        return self.base


class PriceSetting(Protocol):
    """One `[prices."MODEL"]` table of the configuration (daemon.config.ModelPrices has these attributes)."""

    @property
    def input_per_million(self) -> float | None: ...
    @property
    def audio_input_per_million(self) -> float | None: ...
    @property
    def output_per_million(self) -> float | None: ...
    @property
    def cached_input_per_million(self) -> float | None: ...
    @property
    def cached_audio_per_million(self) -> float | None: ...
    @property
    def long_context_above_tokens(self) -> int | None: ...
    @property
    def long_input_per_million(self) -> float | None: ...
    @property
    def long_audio_input_per_million(self) -> float | None: ...
    @property
    def long_output_per_million(self) -> float | None: ...
    @property
    def long_cached_input_per_million(self) -> float | None: ...
    @property
    def long_cached_audio_per_million(self) -> float | None: ...
    @property
    def batch_discount(self) -> float | None: ...


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """A PriceSetting built in code (tests, tools); every field left None keeps the default entry's value."""

    input_per_million: float | None = None
    audio_input_per_million: float | None = None
    output_per_million: float | None = None
    cached_input_per_million: float | None = None
    cached_audio_per_million: float | None = None
    long_context_above_tokens: int | None = None
    long_input_per_million: float | None = None
    long_audio_input_per_million: float | None = None
    long_output_per_million: float | None = None
    long_cached_input_per_million: float | None = None
    long_cached_audio_per_million: float | None = None
    batch_discount: float | None = None


# Version and alias suffixes that name the same model and price: -001, -latest, -preview, -exp, -09-2025, -06-17.
# Never "-lite", "-image", "-tts", "-native-audio", "-8b": those are other models with other prices.
_VERSION_SUFFIX = re.compile(r"-(?:\d{3}|latest|preview|exp|\d{2}-\d{4}|\d{2}-\d{2}|\d{4})$")


@dataclass(frozen=True, slots=True)
class Prices:
    """The price table: the published defaults, with the configuration's `[prices."MODEL"]` applied."""

    models: Mapping[str, ModelPrice] = field(default_factory=dict)

    def lookup(self, model: str) -> ModelPrice | None:
        """The entry for a model name as the API or the config spells it ("models/gemini-2.5-flash-001" is
        gemini-2.5-flash); None if the table does not know it."""
        name = model.strip().lower().rsplit("/", 1)[-1]
        while name:
            if name in self.models:
                return self.models[name]
            shorter = _VERSION_SUFFIX.sub("", name)
            if shorter == name:
                return None
            name = shorter
        return None

    def with_overrides(self, settings: Mapping[str, PriceSetting]) -> Prices:
        """This table with the configuration's entries applied: a known model changes only the keys given, a new
        one needs at least input_per_million and output_per_million (ValueError names what is missing)."""
        models = dict(self.models)
        for name, setting in settings.items():
            known = self.lookup(name)
            key = known.model if known is not None else name.strip().lower()
            models[key] = _overridden(key, known, setting)
        return Prices(models)


def _pick(given: float | None, default: Decimal) -> Decimal:
    return usd(given) if given is not None else default


def _pick_cached(given: float | None, default: Decimal | None) -> Decimal | None:
    return usd(given) if given is not None else default


def _overridden(model: str, known: ModelPrice | None, setting: PriceSetting) -> ModelPrice:
    if known is None:
        missing = [key for key in ("input_per_million", "output_per_million") if getattr(setting, key) is None]
        if missing:
            raise ValueError(f'"{model}" has no published price: give {" and ".join(missing)}')
        text, output = usd(setting.input_per_million or 0), usd(setting.output_per_million or 0)
        old = Rates(input=text, audio_input=text, output=output)  # audio at the text price unless given
    else:
        old = known.base
    base = Rates(input=_pick(setting.input_per_million, old.input),
                 audio_input=_pick(setting.audio_input_per_million, old.audio_input),
                 output=_pick(setting.output_per_million, old.output),
                 cached_input=_pick_cached(setting.cached_input_per_million, old.cached_input),
                 cached_audio=_pick_cached(setting.cached_audio_per_million, old.cached_audio))
    above = setting.long_context_above_tokens or (known.long_context_above if known else None)
    long = _long_rates(known.long if known and known.long else base, setting) if above is not None else None
    discount = _pick(setting.batch_discount, known.batch_discount if known else Decimal("0.5"))
    return ModelPrice(model=model, base=base, long=long, long_context_above=above, batch_discount=discount,
                      read_on=None, source="configuration", via=f'[prices."{model}"]')


def _long_rates(start: Rates, setting: PriceSetting) -> Rates:
    """The tier above the long-context threshold: the keys given, else the default's (or the base tier's)."""
    return Rates(input=_pick(setting.long_input_per_million, start.input),
                 audio_input=_pick(setting.long_audio_input_per_million, start.audio_input),
                 output=_pick(setting.long_output_per_million, start.output),
                 cached_input=_pick_cached(setting.long_cached_input_per_million, start.cached_input),
                 cached_audio=_pick_cached(setting.long_cached_audio_per_million, start.cached_audio))


def _rates(text: str, audio: str, output: str, cached: str | None = None, cached_audio: str | None = None) -> Rates:
    return Rates(Decimal(text), Decimal(audio), Decimal(output),
                 Decimal(cached) if cached is not None else None,
                 Decimal(cached_audio) if cached_audio is not None else None)


_W5 = "W5 pricing notes, a verbatim copy of the page read 2026-06-17"
_EVANGELIST = "api-evangelist/gemini and /deepmind plans, verbatim copies read 2026-09-20 and 2026-10-07"
_TREBEK = "Trebek's pricing reference, copied from the page 2026-04-26"

DEFAULT_PRICES = Prices({entry.model: entry for entry in (
    ModelPrice("gemini-2.5-flash", _rates("0.30", "1.00", "2.50", "0.03", "0.10"), read_on=date(2026, 6, 17),
               via=f"{_W5}; input and audio input again in {_EVANGELIST}"),
    ModelPrice("gemini-2.5-flash-lite", _rates("0.10", "0.30", "0.40", "0.01", "0.03"), read_on=date(2026, 6, 17),
               via=f"{_W5}; output again in {_EVANGELIST}"),
    ModelPrice("gemini-2.5-pro", _rates("1.25", "1.25", "10.00", "0.125", "0.125"),
               long=_rates("2.50", "2.50", "15.00", "0.25", "0.25"), long_context_above=LONG_CONTEXT_TOKENS,
               read_on=date(2026, 6, 17), via=f"{_W5}; input tiers again in {_EVANGELIST}; one price for all "
                                              "modalities, so audio = text"),
    ModelPrice("gemini-2.0-flash", _rates("0.10", "0.70", "0.40", "0.025", "0.175"), read_on=date(2026, 6, 17),
               via=f"{_W5}; deprecated, kept to price older answers"),
    ModelPrice("gemini-3-flash-preview", _rates("0.50", "1.00", "3.00", "0.05", "0.10"), read_on=date(2026, 7, 4),
               via="factquire.com's quote of the page read 2026-07-04 (input, output, cached text); cached "
                   f"audio from {_TREBEK}"),
    ModelPrice("gemini-3.1-flash-lite-preview", _rates("0.25", "0.50", "1.50", "0.025", "0.05"),
               read_on=date(2026, 4, 26), via=f"{_TREBEK} (one source only)"),
    ModelPrice("gemini-3.1-pro-preview", _rates("2.00", "2.00", "12.00", "0.20", "0.20"),
               long=_rates("4.00", "4.00", "18.00", "0.40", "0.40"), long_context_above=LONG_CONTEXT_TOKENS,
               read_on=date(2026, 10, 7), via=f"input and output tiers: {_EVANGELIST}; cached: {_TREBEK}; "
                                              "one price for all modalities, so audio = text"),
    ModelPrice("gemini-3-pro-preview", _rates("2.00", "2.00", "12.00", "0.20", "0.20"),
               long=_rates("4.00", "4.00", "18.00", "0.40", "0.40"), long_context_above=LONG_CONTEXT_TOKENS,
               read_on=date(2026, 2, 4), via="aifreeapi.com's table of the page read 2026-02-04 ($2/$12 up to "
                                             "200k); the >200k and cached prices assumed equal to 3.1 Pro's; "
                                             "reported shut down 2026-03-09, kept to price older answers"),
    ModelPrice("gemini-3.5-flash", _rates("1.50", "1.50", "9.00"), read_on=date(2026, 10, 7),
               via=f"{_EVANGELIST}: one input price for all modalities; no cached price captured, so cached tokens "
                   "are billed as fresh input"),
)})


@dataclass(frozen=True, slots=True)
class Usage:
    """One answer's usageMetadata. `cached_audio_tokens` None: the API did not split the cached tokens."""

    prompt_tokens: int = 0  # promptTokenCount: all of the prompt, cached part included
    audio_tokens: int = 0  # the AUDIO entry of promptTokensDetails
    output_tokens: int = 0  # candidatesTokenCount
    thinking_tokens: int = 0  # thoughtsTokenCount, billed as output
    cached_tokens: int = 0  # cachedContentTokenCount, a part of prompt_tokens
    cached_audio_tokens: int | None = None  # the AUDIO entry of cacheTokensDetails


class UsageRow(Protocol):
    """A token_usage row, as far as pricing reads it."""

    @property
    def prompt_tokens(self) -> int: ...
    @property
    def audio_tokens(self) -> int: ...
    @property
    def output_tokens(self) -> int: ...
    @property
    def thinking_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int | None: ...


def usage_of(row: UsageRow) -> Usage:
    """The usage a ledger row recorded (the ledger keeps no cached audio share: the costlier end is taken)."""
    return Usage(prompt_tokens=row.prompt_tokens or 0, audio_tokens=row.audio_tokens or 0,
                 output_tokens=row.output_tokens or 0, thinking_tokens=row.thinking_tokens or 0,
                 cached_tokens=row.cached_tokens or 0)


def cost(usage: Usage, model: str, *, batch: bool = False, prices: Prices = DEFAULT_PRICES) -> Decimal | None:
    """The exact cost in USD of one answer (unrounded; `ledger_amount` rounds it for the ledger), or None when the
    table has no price for the model. See the module docstring for the rules."""
    entry = prices.lookup(model)
    if entry is None:
        return None
    counts = (usage.prompt_tokens, usage.audio_tokens, usage.output_tokens, usage.thinking_tokens,
              usage.cached_tokens, usage.cached_audio_tokens or 0)
    if min(counts) < 0:
        raise ValueError(f"negative token count in {usage}")
    audio = usage.audio_tokens
    prompt = max(usage.prompt_tokens, audio)
    rates = entry.rates_for(prompt)
    fresh = (Decimal(1) - entry.batch_discount) if batch else Decimal(1)
    cached = min(usage.cached_tokens, prompt)
    if rates.cached_input is None and rates.cached_audio is None:
        cached = 0  # no cache discount known: every prompt token is fresh input
    text = prompt - audio
    low, high = max(0, cached - text), min(cached, audio)

    def priced(cached_audio: int) -> Decimal:
        cached_text = cached - cached_audio
        return ((text - cached_text) * rates.input + (audio - cached_audio) * rates.audio_input) * fresh \
            + cached_text * (rates.cached_input if rates.cached_input is not None else rates.input * fresh) \
            + cached_audio * (rates.cached_audio if rates.cached_audio is not None else rates.audio_input * fresh)

    if usage.cached_audio_tokens is not None:
        input_cost = priced(min(max(usage.cached_audio_tokens, low), high))
    else:
        input_cost = max(priced(low), priced(high))
    output_cost = (usage.output_tokens + usage.thinking_tokens) * rates.output * fresh
    return (input_cost + output_cost) / MILLION


def ledger_amount(amount: Decimal | None) -> Decimal | None:
    """An amount as token_usage.cost_usd stores it: 6 decimal places (a millionth of a dollar), half up."""
    return None if amount is None else amount.quantize(LEDGER_PLACES, rounding=ROUND_HALF_UP)


def format_usd(amount: Decimal) -> str:
    """"$4.87" from a dollar up; below it up to four places ("$0.0032", "$0.20"): answers cost fractions of a cent."""
    if abs(amount) >= 1:
        return f"${amount.quantize(Decimal('0.01'), rounding=ROUND_HALF_UP):,}"
    text = str(amount.quantize(Decimal("0.0001"), rounding=ROUND_HALF_UP))
    while text.endswith("0") and len(text.partition(".")[2]) > 2:
        text = text[:-1]
    return f"${text}"


def text_tokens_bound(*texts: str | None) -> int:
    """An upper bound of the tokens of a prompt's text and system instruction: one per UTF-8 byte (a tokenizer
    with byte fallback never makes more; English runs about one per four bytes)."""
    return sum(len(text.encode("utf-8")) for text in texts if text)


def estimate(audio_tokens: int, output_tokens: int, model: str, prices: Prices = DEFAULT_PRICES, *,
             text_tokens: int = 0, batch: bool = False) -> Decimal | None:
    """An upper bound of what one generation call will cost, before it is sent; None when the model has no price.

    `audio_tokens`: the prompt's estimated audio tokens (queue.estimate_audio_tokens: 32 per second, the higher of
    the two rates the docs have given). `text_tokens`: `text_tokens_bound(prompt_text, system_instruction)`.
    `output_tokens`: the call's max_output_tokens. That is the conservative choice and a true bound: thinking
    tokens count against max_output_tokens (field notes: they cut transcripts short), so one call can never bill
    more output than it; a cut-off answer retried with a larger budget is another call, checked again. Nothing is
    assumed cached (a cache hit only lowers the cost)."""
    usage = Usage(prompt_tokens=audio_tokens + text_tokens, audio_tokens=audio_tokens, output_tokens=output_tokens)
    return cost(usage, model, batch=batch, prices=prices)


def day_start(now: datetime) -> datetime:
    """The start of `now`'s day in UTC: where "today" begins for `status` and the daily budget."""
    utc = _utc(now)
    return datetime(utc.year, utc.month, utc.day, tzinfo=UTC)


def month_start(now: datetime) -> datetime:
    utc = _utc(now)
    return datetime(utc.year, utc.month, 1, tzinfo=UTC)


def next_day(now: datetime) -> datetime:
    """The next midnight UTC: when a daily budget starts again."""
    return day_start(now) + timedelta(days=1)


def next_month(now: datetime) -> datetime:
    """The first of next month, 00:00 UTC: when a monthly budget starts again."""
    start = month_start(now)
    return start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)


def _utc(now: datetime) -> datetime:
    if now.tzinfo is None:
        raise ValueError(f"naive datetime {now!r}: pass tz-aware UTC times")
    return now.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class Budget:
    """`daily_budget_usd` and `monthly_budget_usd`; None: no limit."""

    daily_usd: Decimal | None = None
    monthly_usd: Decimal | None = None

    @classmethod
    def of(cls, daily: float | Decimal | None, monthly: float | Decimal | None) -> Budget:
        return cls(usd(daily) if daily is not None else None, usd(monthly) if monthly is not None else None)

    @property
    def limited(self) -> bool:
        return self.daily_usd is not None or self.monthly_usd is not None


@dataclass(frozen=True, slots=True)
class BudgetVerdict:
    """Whether the next call may run; if not, a sentence for `status` and when it may (None: not by waiting)."""

    allowed: bool
    reason: str | None = None
    until: datetime | None = None


def budget_check(spent_today: Decimal, spent_month: Decimal, estimate_next: Decimal | None, budget: Budget,
                 now: datetime, *, force: bool = False, model: str = "") -> BudgetVerdict:
    """May a call estimated at `estimate_next` run now? Exactly reaching a limit is allowed; passing it is not.

    `force` is the prompt's `force_budget` (ask --force): allowed, whatever was spent. An estimate of None (the
    model has no price) under a budget waits: the budget cannot be kept for a cost that cannot be known."""
    if force:
        return BudgetVerdict(True, "past the budget by ask --force" if budget.limited else None)
    if not budget.limited:
        return BudgetVerdict(True)
    if estimate_next is None:
        return BudgetVerdict(False, f"no price is known for the model {model or '(unnamed)'}, so the budget cannot "
                                    f'be kept: add [prices."{model or "MODEL"}"] to the configuration, or ask --force')
    windows = [(limit, spent, label, reset) for limit, spent, label, reset in (
        (budget.monthly_usd, spent_month, "monthly", next_month(now)),
        (budget.daily_usd, spent_today, "daily", next_day(now))) if limit is not None]
    for limit, _, label, _ in windows:  # a call no wait can make fit
        if estimate_next > limit:
            return BudgetVerdict(False, f"this call alone (about {format_usd(estimate_next)}) is more than the "
                                        f"{label} budget ({format_usd(limit)}): run it with ask --force, or raise "
                                        f"{label}_budget_usd")
    for limit, spent, label, reset in windows:  # the monthly limit first: waiting for midnight would not help
        if spent + estimate_next > limit:
            return BudgetVerdict(False, f"the {label} budget ({format_usd(limit)}) would be passed: "
                                        f"{format_usd(spent)} spent, the next call about {format_usd(estimate_next)}; "
                                        f"waiting until {reset:%Y-%m-%d %H:%M} UTC (or ask --force)", reset)
    return BudgetVerdict(True)


class LedgerRow(UsageRow, Protocol):
    """A token_usage row, for summing the spend."""

    @property
    def at(self) -> datetime: ...
    @property
    def model(self) -> str: ...
    @property
    def batch(self) -> bool | None: ...
    @property
    def cost_usd(self) -> Decimal | None: ...


@dataclass(frozen=True, slots=True)
class Spending:
    """What `status` shows: today's and this month's spend, and the models whose answers have no price."""

    today_usd: Decimal
    month_usd: Decimal
    unpriced_models: tuple[str, ...] = ()


def spending(rows: Iterable[LedgerRow], now: datetime, prices: Prices = DEFAULT_PRICES) -> Spending:
    """The spend of this month's ledger rows: their stored cost, or (stored None: the model had no price when the
    answer came) their cost at today's prices, if the table knows the model by now."""
    today, month, unpriced = Decimal(0), Decimal(0), set()
    first, midnight = month_start(now), day_start(now)
    for row in rows:
        at = _utc(row.at)
        if at < first:
            continue
        amount = row.cost_usd
        if amount is None:
            amount = ledger_amount(cost(usage_of(row), row.model, batch=bool(row.batch), prices=prices))
        if amount is None:
            unpriced.add(row.model)
            continue
        month += amount
        today += amount if at >= midnight else 0
    return Spending(today, month, tuple(sorted(unpriced)))

