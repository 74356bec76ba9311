"""Prices, costs and budget verdicts: exact arithmetic on cases computed by hand, then properties over random ones
(hypothesis is not installed: a seeded loop instead)."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from daemon.prompts import pricing
from daemon.prompts.pricing import Budget, PriceOverride, Usage, budget_check, cost, estimate

D = Decimal
ONE_MINUTE = 1920  # audio tokens: 32 per second


# --- cost: hand-computed cases (prices per million: flash 0.30 text, 1.00 audio, 2.50 output) --------------------

def test_audio_and_text_input_are_priced_apart() -> None:
    usage = Usage(prompt_tokens=ONE_MINUTE + 80, audio_tokens=ONE_MINUTE, output_tokens=500)
    # 1920 x 1.00 + 80 x 0.30 + 500 x 2.50 = 1920 + 24 + 1250 = 3194 millionths
    assert cost(usage, "gemini-2.5-flash") == D("0.003194")
    # flash-lite: 1920 x 0.30 + 80 x 0.10 + 500 x 0.40 = 576 + 8 + 200
    assert cost(usage, "gemini-2.5-flash-lite") == D("0.000784")
    # 2.0 flash: 1920 x 0.70 + 80 x 0.10 + 500 x 0.40 = 1344 + 8 + 200
    assert cost(usage, "gemini-2.0-flash") == D("0.001552")


def test_text_only_prompt_pays_the_text_price() -> None:
    assert cost(Usage(prompt_tokens=1_000_000), "gemini-2.5-flash") == D("0.30")


def test_thinking_tokens_are_billed_as_output() -> None:
    usage = Usage(prompt_tokens=0, output_tokens=500, thinking_tokens=1500)
    assert cost(usage, "gemini-2.5-flash") == D("0.005")  # 2000 x 2.50
    assert cost(usage, "gemini-2.5-flash") == cost(Usage(output_tokens=2000), "gemini-2.5-flash")


def test_cached_tokens_are_taken_out_of_the_prompt_and_billed_at_the_cached_price() -> None:
    usage = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000, cached_audio_tokens=45_000)
    # fresh audio 45,000 x 1.00 + fresh text 5,000 x 0.30 + cached audio 45,000 x 0.10 + cached text 5,000 x 0.03
    # = 45,000 + 1,500 + 4,500 + 150 = 51,150 millionths (not 100,000 tokens at full price, nor 150,000 tokens)
    assert cost(usage, "gemini-2.5-flash") == D("0.05115")


def test_unsplit_cached_tokens_take_the_costlier_audio_share() -> None:
    usage = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000)
    # The audio share of the 50,000 cached tokens is between 40,000 (text first) and 50,000 (audio first).
    # 40,000: 50,000 x 1.00 + 0 x 0.30 + 40,000 x 0.10 + 10,000 x 0.03 = 54,300
    # 50,000: 40,000 x 1.00 + 10,000 x 0.30 + 50,000 x 0.10 + 0 x 0.03 = 48,000
    assert cost(usage, "gemini-2.5-flash") == D("0.0543")
    text_first = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000, cached_audio_tokens=40_000)
    assert cost(usage, "gemini-2.5-flash") == cost(text_first, "gemini-2.5-flash")


def test_a_reported_cached_audio_share_outside_what_is_possible_is_clamped() -> None:
    impossible = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000, cached_audio_tokens=70_000)
    audio_first = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000, cached_audio_tokens=50_000)
    assert cost(impossible, "gemini-2.5-flash") == cost(audio_first, "gemini-2.5-flash") == D("0.048")


def test_batch_halves_input_and_output_but_not_cached_reads() -> None:
    usage = Usage(prompt_tokens=ONE_MINUTE + 80, audio_tokens=ONE_MINUTE, output_tokens=500)
    assert cost(usage, "gemini-2.5-flash", batch=True) == D("0.001597")  # 3194 / 2
    cached = Usage(prompt_tokens=100_000, audio_tokens=90_000, cached_tokens=50_000, cached_audio_tokens=45_000)
    # 45,000 x 0.50 + 5,000 x 0.15 + 45,000 x 0.10 + 5,000 x 0.03 = 22,500 + 750 + 4,500 + 150
    assert cost(cached, "gemini-2.5-flash", batch=True) == D("0.0279")


def test_long_context_tier_starts_above_200k_prompt_tokens() -> None:
    at_limit = Usage(prompt_tokens=200_000, audio_tokens=200_000, output_tokens=1000)
    above = Usage(prompt_tokens=200_001, audio_tokens=200_001, output_tokens=1000)
    assert cost(at_limit, "gemini-2.5-pro") == D("0.26")  # 200,000 x 1.25 + 1,000 x 10
    assert cost(above, "gemini-2.5-pro") == D("0.5150025")  # 200,001 x 2.50 + 1,000 x 15
    # The tier is chosen by the whole prompt, cached part included, and prices the cached reads too.
    cached = Usage(prompt_tokens=300_000, cached_tokens=100_000)
    assert cost(cached, "gemini-2.5-pro") == D("0.525")  # 200,000 x 2.50 + 100,000 x 0.25
    assert cost(Usage(prompt_tokens=200_001), "gemini-3.1-pro-preview") == D("0.800004")  # x 4.00
    # Flash has one tier.
    assert cost(Usage(prompt_tokens=1_000_000), "gemini-2.5-flash") == D("0.3")


def test_a_model_without_a_cached_price_bills_cached_tokens_as_fresh_input() -> None:
    usage = Usage(prompt_tokens=10_000, cached_tokens=10_000)
    assert cost(usage, "gemini-3.5-flash") == cost(Usage(prompt_tokens=10_000), "gemini-3.5-flash") == D("0.015")


def test_unknown_model_has_no_price() -> None:
    usage = Usage(prompt_tokens=1000, output_tokens=10)
    for model in ("gpt-4o", "gemini-2.5-flash-image", "gemini-2.5-flash-native-audio-preview-09-2025",
                  "gemini-flash-latest", "gemini-1.5-flash-8b", ""):
        assert cost(usage, model) is None, model
    assert estimate(ONE_MINUTE, 100, "gpt-4o") is None


@pytest.mark.parametrize(("name", "entry"), [
    ("gemini-2.5-flash", "gemini-2.5-flash"),
    ("models/gemini-2.5-flash", "gemini-2.5-flash"),
    ("gemini-2.5-flash-001", "gemini-2.5-flash"),
    ("models/gemini-2.5-flash-001", "gemini-2.5-flash"),
    ("Gemini-2.5-Flash ", "gemini-2.5-flash"),
    ("gemini-2.5-flash-preview-09-2025", "gemini-2.5-flash"),
    ("gemini-2.5-flash-lite", "gemini-2.5-flash-lite"),
    ("gemini-2.5-flash-lite-preview-06-17", "gemini-2.5-flash-lite"),
    ("gemini-2.5-flash-lite-001", "gemini-2.5-flash-lite"),
    ("gemini-2.5-pro-exp-03-25", "gemini-2.5-pro"),
    ("projects/p/locations/us/publishers/google/models/gemini-2.5-pro", "gemini-2.5-pro"),
    ("gemini-2.0-flash-001", "gemini-2.0-flash"),
    ("gemini-3-pro-preview", "gemini-3-pro-preview"),
    ("gemini-3-flash-preview", "gemini-3-flash-preview"),
    ("gemini-3.1-flash-lite-preview", "gemini-3.1-flash-lite-preview"),
])
def test_suffixed_names_map_to_their_base_entry(name: str, entry: str) -> None:
    found = pricing.DEFAULT_PRICES.lookup(name)
    assert found is not None and found.model == entry


def test_inconsistent_counts_are_clamped_not_trusted() -> None:
    # Audio above the prompt count: the prompt is at least its audio. Cached above the prompt: at most the prompt.
    assert cost(Usage(prompt_tokens=10, audio_tokens=1000), "gemini-2.5-flash") == D("0.001")
    assert cost(Usage(prompt_tokens=1000, cached_tokens=5000), "gemini-2.5-flash") == D("0.00003")
    with pytest.raises(ValueError, match="negative"):
        cost(Usage(prompt_tokens=-1), "gemini-2.5-flash")


def test_every_default_entry_is_dated_and_sourced() -> None:
    for entry in pricing.DEFAULT_PRICES.models.values():
        assert entry.read_on is not None and entry.source == pricing.PRICING_URL and entry.via, entry.model
        assert entry.batch_discount == D("0.5")
        assert (entry.long is None) == (entry.long_context_above is None)


# --- configuration overrides ---------------------------------------------------------------------------------------

def test_an_override_changes_only_the_keys_it_gives() -> None:
    prices = pricing.DEFAULT_PRICES.with_overrides({"gemini-2.5-flash": PriceOverride(audio_input_per_million=0.7)})
    usage = Usage(prompt_tokens=ONE_MINUTE + 80, audio_tokens=ONE_MINUTE, output_tokens=500)
    # 1920 x 0.70 + 80 x 0.30 + 500 x 2.50 = 1344 + 24 + 1250
    assert cost(usage, "gemini-2.5-flash", prices=prices) == D("0.002618")
    entry = prices.lookup("gemini-2.5-flash")
    assert entry is not None and entry.source == "configuration" and entry.read_on is None
    assert entry.base.cached_audio == D("0.10")
    assert cost(usage, "gemini-2.5-pro", prices=prices) == cost(usage, "gemini-2.5-pro")  # others untouched


def test_an_override_under_a_suffixed_name_changes_the_base_entry() -> None:
    prices = pricing.DEFAULT_PRICES.with_overrides({"models/gemini-2.5-flash-001": PriceOverride(output_per_million=3)})
    assert set(prices.models) == set(pricing.DEFAULT_PRICES.models)
    assert cost(Usage(output_tokens=1_000_000), "gemini-2.5-flash", prices=prices) == D("3")


def test_a_new_model_needs_input_and_output_prices() -> None:
    prices = pricing.DEFAULT_PRICES.with_overrides(
        {"my-tuned-model": PriceOverride(input_per_million=1, output_per_million=2)})
    usage = Usage(prompt_tokens=1000, audio_tokens=600, output_tokens=100, cached_tokens=500)
    # audio at the text price, no cache discount: 1000 x 1 + 100 x 2
    assert cost(usage, "my-tuned-model", prices=prices) == D("0.0012")
    with pytest.raises(ValueError, match='"other" has no published price: give output_per_million'):
        pricing.DEFAULT_PRICES.with_overrides({"other": PriceOverride(input_per_million=1)})


def test_a_zero_price_is_a_price() -> None:
    prices = pricing.DEFAULT_PRICES.with_overrides(
        {"gemini-2.5-flash": PriceOverride(input_per_million=0, audio_input_per_million=0, output_per_million=0)})
    assert cost(Usage(prompt_tokens=5000, audio_tokens=4000, output_tokens=10), "gemini-2.5-flash",
                prices=prices) == 0


def test_overrides_reach_batch_discount_and_long_context_tier() -> None:
    prices = pricing.DEFAULT_PRICES.with_overrides({
        "gemini-2.5-flash": PriceOverride(batch_discount=0.25),
        "gemini-2.5-pro": PriceOverride(long_context_above_tokens=100_000, long_output_per_million=20),
    })
    assert cost(Usage(output_tokens=1_000_000), "gemini-2.5-flash", batch=True, prices=prices) == D("1.875")
    # 150,000 tokens is now in the long tier: input 2.50 (the default's long tier), output 20
    assert cost(Usage(prompt_tokens=150_000, output_tokens=1000), "gemini-2.5-pro", prices=prices) == D("0.395")


# --- ledger and display ------------------------------------------------------------------------------------------

def test_ledger_amount_keeps_millionths_of_a_dollar() -> None:
    assert pricing.ledger_amount(D("0.0000005")) == D("0.000001")
    assert pricing.ledger_amount(D("0.00000049")) == D("0.000000")
    assert pricing.ledger_amount(D("0.5150025")) == D("0.515003")
    assert pricing.ledger_amount(None) is None


def test_format_usd() -> None:
    assert pricing.format_usd(D("1234.5")) == "$1,234.50"
    assert pricing.format_usd(D("4.875")) == "$4.88"
    assert pricing.format_usd(D("0.003194")) == "$0.0032"
    assert pricing.format_usd(D(0)) == "$0.00"
    assert pricing.format_usd(D("0.2")) == "$0.20"
    assert pricing.format_usd(D("0.00304")) == "$0.003"


# --- estimate ------------------------------------------------------------------------------------------------------

def test_estimate_bounds_one_call_by_its_output_budget() -> None:
    text = pricing.text_tokens_bound("Transcribe this recording.", None)
    assert text == 26
    # 30 minutes: 57,600 x 1.00 + 26 x 0.30 + 8,192 x 2.50 = 57,600 + 7.8 + 20,480
    assert estimate(30 * ONE_MINUTE, 8192, "gemini-2.5-flash", text_tokens=text) == D("0.0780878")
    assert estimate(30 * ONE_MINUTE, 8192, "gemini-2.5-flash", text_tokens=text, batch=True) == D("0.0390439")


def test_text_tokens_bound_counts_utf8_bytes() -> None:
    assert pricing.text_tokens_bound("héllo", "日本") == 6 + 6
    assert pricing.text_tokens_bound(None, "") == 0


# --- budget verdicts -----------------------------------------------------------------------------------------------

DAILY = Budget.of(5.0, None)


def test_a_call_that_reaches_the_limit_exactly_may_run() -> None:
    now = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    assert budget_check(D("4.80"), D("4.80"), D("0.20"), DAILY, now).allowed
    verdict = budget_check(D("4.800001"), D("4.800001"), D("0.20"), DAILY, now)
    assert not verdict.allowed
    assert verdict.until == datetime(2026, 11, 16, tzinfo=UTC)
    assert verdict.reason == ("the daily budget ($5.00) would be passed: $4.80 spent, the next call about $0.20; "
                              "waiting until 2026-11-16 00:00 UTC (or ask --force)")


def test_daily_budget_waits_until_the_next_utc_midnight() -> None:
    just_before = datetime(2026, 11, 15, 23, 59, 59, 999999, tzinfo=UTC)
    assert budget_check(D(5), D(5), D("0.01"), DAILY, just_before).until == datetime(2026, 11, 16, tzinfo=UTC)
    at_midnight = datetime(2026, 11, 16, tzinfo=UTC)
    assert budget_check(D(5), D(5), D("0.01"), DAILY, at_midnight).until == datetime(2026, 11, 17, tzinfo=UTC)
    # A time in another zone is judged in UTC: 20:00 at UTC-5 is already the 16th.
    evening = datetime(2026, 11, 15, 20, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert budget_check(D(5), D(5), D("0.01"), DAILY, evening).until == datetime(2026, 11, 17, tzinfo=UTC)
    assert pricing.day_start(evening) == datetime(2026, 11, 16, tzinfo=UTC)


def test_monthly_budget_waits_until_the_first_of_next_month() -> None:
    monthly = Budget.of(None, 50)
    assert budget_check(D(0), D("49.99"), D("0.02"), monthly,
                        datetime(2026, 11, 30, 23, 0, tzinfo=UTC)).until == datetime(2026, 12, 1, tzinfo=UTC)
    assert budget_check(D(0), D("49.99"), D("0.02"), monthly,
                        datetime(2026, 12, 31, 23, 59, tzinfo=UTC)).until == datetime(2027, 1, 1, tzinfo=UTC)
    assert budget_check(D(0), D("49.99"), D("0.01"), monthly, datetime(2026, 12, 31, tzinfo=UTC)).allowed
    assert pricing.month_start(datetime(2026, 12, 31, 23, 59, tzinfo=UTC)) == datetime(2026, 12, 1, tzinfo=UTC)


def test_when_both_limits_bind_the_later_reset_is_the_one_to_wait_for() -> None:
    both = Budget.of(5, 50)
    verdict = budget_check(D("4.99"), D("49.99"), D("0.02"), both, datetime(2026, 11, 15, 12, tzinfo=UTC))
    assert not verdict.allowed and verdict.until == datetime(2026, 12, 1, tzinfo=UTC)
    assert verdict.reason is not None and verdict.reason.startswith("the monthly budget ($50.00)")
    daily_only = budget_check(D("4.99"), D("10"), D("0.02"), both, datetime(2026, 11, 15, 12, tzinfo=UTC))
    assert daily_only.until == datetime(2026, 11, 16, tzinfo=UTC)


def test_a_call_larger_than_the_whole_budget_cannot_wait_its_way_in() -> None:
    verdict = budget_check(D(0), D(0), D("6"), Budget.of(5, 50), datetime(2026, 11, 15, tzinfo=UTC))
    assert not verdict.allowed and verdict.until is None
    assert verdict.reason == ("this call alone (about $6.00) is more than the daily budget ($5.00): run it with "
                              "ask --force, or raise daily_budget_usd")


def test_force_goes_past_the_budget() -> None:
    verdict = budget_check(D(100), D(100), D(6), DAILY, datetime(2026, 11, 15, tzinfo=UTC), force=True)
    assert verdict.allowed and verdict.reason == "past the budget by ask --force"


def test_without_a_budget_everything_runs_even_unpriced() -> None:
    assert budget_check(D(100), D(1000), None, Budget(), datetime(2026, 11, 15, tzinfo=UTC)) == \
        pricing.BudgetVerdict(True)


def test_an_unpriced_model_waits_under_a_budget_and_says_what_to_do() -> None:
    verdict = budget_check(D(0), D(0), None, DAILY, datetime(2026, 11, 15, tzinfo=UTC), model="gpt-4o")
    assert not verdict.allowed and verdict.until is None
    assert verdict.reason is not None and '[prices."gpt-4o"]' in verdict.reason and "--force" in verdict.reason


def test_naive_times_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        budget_check(D(0), D(0), D(1), DAILY, datetime(2026, 11, 15))  # noqa: DTZ001


# --- spending ------------------------------------------------------------------------------------------------------

@dataclass
class Row:
    at: datetime
    model: str
    cost_usd: Decimal | None = None
    prompt_tokens: int = 0
    audio_tokens: int = 0
    output_tokens: int = 0
    thinking_tokens: int = 0
    cached_tokens: int | None = 0
    batch: bool | None = False


def test_spending_sums_today_and_this_month_and_names_unpriced_models() -> None:
    now = datetime(2026, 11, 15, 12, tzinfo=UTC)
    rows = [
        Row(now - timedelta(hours=1), "gemini-2.5-flash", D("0.010000")),
        Row(now - timedelta(hours=13), "gemini-2.5-flash", D("0.020000")),  # yesterday
        Row(datetime(2026, 10, 31, 23, tzinfo=UTC), "gemini-2.5-flash", D("9")),  # last month
        Row(now, "gemini-2.5-flash", None, prompt_tokens=1_000_000),  # stored before prices: 0.30 now
        Row(now, "gemini-2.5-flash", None, prompt_tokens=1_000_000, batch=True),  # 0.15
        Row(now, "my-model", None, prompt_tokens=1000),
    ]
    spent = pricing.spending(rows, now)
    assert spent == pricing.Spending(D("0.46"), D("0.48"), ("my-model",))
    priced = pricing.DEFAULT_PRICES.with_overrides({"my-model": PriceOverride(input_per_million=1000,
                                                                              output_per_million=1000)})
    assert pricing.spending(rows, now, priced).unpriced_models == ()


# --- properties ----------------------------------------------------------------------------------------------------

def _random_usage(rng: random.Random) -> Usage:
    prompt = rng.choice([rng.randrange(0, 5000), rng.randrange(195_000, 205_000), rng.randrange(0, 2_000_000)])
    audio = rng.randrange(0, prompt + 1)
    cached = rng.randrange(0, prompt + 1) if rng.random() < 0.5 else 0
    cached_audio = rng.choice([None, rng.randrange(0, cached + 1)])
    return Usage(prompt, audio, rng.randrange(0, 70_000), rng.randrange(0, 30_000), cached, cached_audio)


def _cost(usage: Usage, model: str, *, batch: bool = False) -> Decimal:
    amount = cost(usage, model, batch=batch)
    assert amount is not None
    return amount


def _bump(usage: Usage, field: str, rng: random.Random) -> Usage:
    step = rng.choice([1, rng.randrange(1, 10_000)])
    values = {item.name: getattr(usage, item.name) for item in dataclasses.fields(usage)}
    if field == "text":  # one more text token
        values["prompt_tokens"] += step
    elif field == "audio":  # one more audio token
        values["prompt_tokens"] += step
        values["audio_tokens"] += step
    elif field == "text_to_audio":  # a prompt token counted as audio instead of text
        step = min(step, usage.prompt_tokens - usage.audio_tokens)
        values["audio_tokens"] += step
    else:
        values[field] += step
    return Usage(**values)


@pytest.mark.parametrize("model", sorted(pricing.DEFAULT_PRICES.models))
def test_cost_is_monotonic_in_every_token_count(model: str) -> None:
    rng = random.Random(f"pricing-{model}")
    for _ in range(1500):
        usage = _random_usage(rng)
        for batch in (False, True):
            before = _cost(usage, model, batch=batch)
            assert before >= 0
            for field in ("text", "audio", "text_to_audio", "output_tokens", "thinking_tokens"):
                assert _cost(_bump(usage, field, rng), model, batch=batch) >= before, (usage, field, batch)
            # More of the same prompt read from the cache only makes it cheaper.
            if usage.cached_tokens < usage.prompt_tokens:
                unsplit = dataclasses.replace(usage, cached_audio_tokens=None)
                more = dataclasses.replace(unsplit, cached_tokens=usage.cached_tokens + rng.randrange(1, 1000))
                assert _cost(more, model, batch=batch) <= _cost(unsplit, model, batch=batch), (usage, batch)
        assert _cost(usage, model, batch=True) <= _cost(usage, model)


@pytest.mark.parametrize("model", sorted(pricing.DEFAULT_PRICES.models))
def test_the_estimate_is_never_below_what_the_call_can_cost(model: str) -> None:
    rng = random.Random(f"estimate-{model}")
    for _ in range(1500):
        audio, text, budget = rng.randrange(0, 400_000), rng.randrange(0, 2000), rng.randrange(1, 65_536)
        bound = estimate(audio, budget, model, text_tokens=text)
        thinking = rng.randrange(0, budget + 1)
        cached = rng.randrange(0, audio + text + 1)
        actual = Usage(audio + text, audio, rng.randrange(0, budget - thinking + 1), thinking, cached)
        assert bound is not None and _cost(actual, model) <= bound, (actual, bound)
