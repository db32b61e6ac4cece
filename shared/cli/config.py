"""``paylab config``: every configuration key, its value and its meaning."""

from __future__ import annotations

from shared.cli.console import load_settings, out


def config() -> None:
    """Show every configuration key, its value and what it does."""
    from rich.table import Table

    from shared.ops.settings import Settings

    settings = load_settings()
    table = Table(title="paylab configuration (PAYLAB_<KEY> or .env)")
    table.add_column("key")
    table.add_column("value")
    table.add_column("meaning")
    for name, field in Settings.model_fields.items():
        value = getattr(settings, name)
        shown = "(secret)" if "key" in name and name != "key_file" else str(value)
        table.add_row(f"PAYLAB_{name.upper()}", shown, field.description or "")
    out.print(table)
