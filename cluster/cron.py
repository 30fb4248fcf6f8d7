"""Five-field cron expressions (minute hour day-of-month month day-of-week) and their fire times.

Pure functions, no I/O: `parse_cron` validates an expression, `previous_fire` / `next_fire` give the
fire time at or before / after a moment in a time zone. A scheduler that derives its due time from
the clock with `previous_fire` needs no state: a missed night fires once, at the latest due time.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
DAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
MACROS = {"@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
          "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *"}
# (name, lowest, highest, names): day-of-week 7 is Sunday too, as in Vixie cron.
FIELDS = (("minute", 0, 59, ()), ("hour", 0, 23, ()), ("day-of-month", 1, 31, ()),
          ("month", 1, 12, MONTHS), ("day-of-week", 0, 7, DAYS))
SEARCH_DAYS = 366 * 8  # "0 0 29 2 1" (Feb 29 or a Monday) fires within days; "0 0 30 2 *" never fires


class CronError(ValueError):
    """An expression that is not valid cron; the message repeats it."""


@dataclass(frozen=True)
class Cron:
    expression: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]  # days of the month
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday .. 6 = Saturday
    any_day: bool  # day-of-month is "*"
    any_weekday: bool  # day-of-week is "*"

    def matches_date(self, day: date) -> bool:
        if day.month not in self.months:
            return False
        by_day = day.day in self.days
        by_weekday = (day.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # only the restricted field counts (both "*": every day)
            return by_day and by_weekday
        return by_day or by_weekday  # both restricted: either one (cron's rule)


def _value(text: str, field: str, low: int, high: int, names: tuple[str, ...], expression: str) -> int:
    lowered = text.lower()
    if names and lowered in names:
        return names.index(lowered) + (1 if field == "month" else 0)
    if not text.isdigit():
        raise CronError(f"cron {expression!r}: {field} {text!r} is not a number"
                        + (f" or a name ({', '.join(n.upper() for n in names)})" if names else ""))
    value = int(text)
    if not low <= value <= high:
        raise CronError(f"cron {expression!r}: {field} {value} not in {low}..{high}")
    return value


def _field(text: str, field: str, low: int, high: int, names: tuple[str, ...], expression: str) -> set[int]:
    values: set[int] = set()
    for item in text.split(","):
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) < 1:
                raise CronError(f"cron {expression!r}: {field} step {step_text!r} must be a number >= 1")
            step = int(step_text)
        if base == "*":
            start, stop = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            start = _value(a, field, low, high, names, expression)
            stop = _value(b, field, low, high, names, expression)
            if stop < start:
                raise CronError(f"cron {expression!r}: {field} range {base!r} runs backwards")
        elif base:
            start = _value(base, field, low, high, names, expression)
            stop = high if step_text else start  # "5/15": from 5 to the end, every 15
        else:
            raise CronError(f"cron {expression!r}: {field} has an empty item in {text!r}")
        values.update(range(start, stop + 1, step))
    return values


def parse_cron(expression: str) -> Cron:
    """Minute, hour, day of month, month, day of week; each a `*`, number, name (JAN, MON), range
    `a-b`, step `*/n` or `a-b/n`, or a comma list of these; or a macro (@daily, @hourly, ...)."""
    if not isinstance(expression, str):
        raise CronError(f"cron {expression!r}: expected a string of five fields like '0 2 * * *'")
    text = MACROS.get(expression.strip().lower(), expression.strip())
    parts = text.split()
    if len(parts) != 5:
        raise CronError(f"cron {expression!r}: expected five fields (minute hour day-of-month month "
                        f"day-of-week), got {len(parts)}")
    sets = [_field(part, name, low, high, names, expression) for part, (name, low, high, names) in zip(parts, FIELDS)]
    weekdays = {d % 7 for d in sets[4]}
    return Cron(expression=expression, minutes=frozenset(sets[0]), hours=frozenset(sets[1]),
                days=frozenset(sets[2]), months=frozenset(sets[3]), weekdays=frozenset(weekdays),
                any_day=parts[2] == "*", any_weekday=parts[4] == "*")


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise CronError(f"time zone {name!r} is not an IANA time zone name such as UTC or Europe/Paris") from None


def _utc(day: date, hour: int, minute: int, tz: ZoneInfo) -> datetime:
    # A local time inside a DST gap maps through the offset before the change (fold=0): it fires once.
    return datetime.combine(day, time(hour, minute), tzinfo=tz).astimezone(timezone.utc)


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def previous_fire(cron: Cron, at: datetime, tz: str = "UTC") -> datetime | None:
    """The latest fire time <= `at` (UTC, aware), or None if there is none within eight years."""
    at = _aware(at)
    zone_info = zone(tz)
    local = at.astimezone(zone_info)
    for back in range(SEARCH_DAYS):
        day = local.date() - timedelta(days=back)
        if not cron.matches_date(day):
            continue
        for hour in sorted(cron.hours, reverse=True):
            for minute in sorted(cron.minutes, reverse=True):
                fire = _utc(day, hour, minute, zone_info)
                if fire <= at:
                    return fire
    return None


def next_fire(cron: Cron, after: datetime, tz: str = "UTC") -> datetime | None:
    """The earliest fire time > `after` (UTC, aware), or None if there is none within eight years."""
    after = _aware(after)
    zone_info = zone(tz)
    local = after.astimezone(zone_info)
    for ahead in range(-1, SEARCH_DAYS):  # from the day before: a DST shift can move a time across midnight
        day = local.date() + timedelta(days=ahead)
        if not cron.matches_date(day):
            continue
        for hour in sorted(cron.hours):
            for minute in sorted(cron.minutes):
                fire = _utc(day, hour, minute, zone_info)
                if fire > after:
                    return fire
    return None
