"""Small clinical and demographic rules shared by record building and record evolution."""

from __future__ import annotations

import random

from sandbox.population import vocab

ANALYTES: dict[str, vocab.Analyte] = {a.code.code: a for p in vocab.PANELS for a in p.analytes}


def numeric_flag(analyte: vocab.Analyte, value: float) -> str | None:
    """H/L/HH/LL/N from the reference and critical ranges; None when the analyte has no range."""
    if analyte.low is None and analyte.high is None:
        return None
    if analyte.critical_low is not None and value < analyte.critical_low:
        return "LL"
    if analyte.critical_high is not None and value > analyte.critical_high:
        return "HH"
    if analyte.low is not None and value < analyte.low:
        return "L"
    if analyte.high is not None and value > analyte.high:
        return "H"
    return "N"


def text_flag(analyte: vocab.Analyte, value: str) -> str:
    """Text results: the first listed value is the normal one; anything else is abnormal."""
    return "N" if value == analyte.text_values[0] else "A"


def draw_numeric(analyte: vocab.Analyte, rng: random.Random) -> float:
    """A plausible value: mostly near the centre, sometimes far out (which makes flags appear)."""
    spread = analyte.sd * (2.5 if rng.random() < 0.08 else 1.0)
    value = rng.gauss(analyte.mean, spread)
    floor = 10 ** (-analyte.decimals) if analyte.decimals else 1.0
    return round(max(value, floor), analyte.decimals)


def draw_text(analyte: vocab.Analyte, rng: random.Random) -> str:
    if rng.random() < 0.82:
        return analyte.text_values[0]
    return rng.choice(analyte.text_values[1:])


def format_numeric(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def phone(area_code: str, rng: random.Random) -> str:
    """An E.164 US number; exchange and line avoid N11 and leading 0/1 like real NANP numbers."""
    exchange = rng.randrange(200, 1000)
    if exchange % 100 == 11:
        exchange += 1
    return f"+1{area_code}{exchange:03d}{rng.randrange(0, 10000):04d}"


def street_address(rng: random.Random) -> str:
    return f"{rng.randrange(10, 9999)} {rng.choice(vocab.STREET_NAMES)} {rng.choice(vocab.STREET_SUFFIXES)}"


def email(given: str, family: str, rng: random.Random) -> str:
    local = f"{given}.{family}".lower().replace(" ", "").replace("'", "")
    return f"{local}{rng.randrange(1, 999)}@{rng.choice(vocab.EMAIL_DOMAINS)}"
