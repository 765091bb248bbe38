"""`clip-pipeline devices`: what each backend of the registry can see."""

from __future__ import annotations

import click

from pipeline.commands import CONTEXT


@click.command(context_settings=CONTEXT)
def devices() -> None:
    """List what each backend can see, and why a backend is unavailable."""
    from pipeline.backends import BACKENDS, get_backend

    for name in BACKENDS:
        try:
            info = get_backend(name).probe()
        except ModuleNotFoundError as exc:
            if (exc.name or "").startswith("pipeline.backends"):  # backend module not in this build
                reason = f"not included in this build ({exc.name.replace('.', '/')}.py is missing)"
            else:
                reason = f"Python module {exc.name} is not installed"
            info = {"available": False, "devices": [], "reason": reason}
        except ImportError as exc:
            info = {"available": False, "devices": [], "reason": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a probe must never crash the listing
            info = {"available": False, "devices": [], "reason": f"{type(exc).__name__}: {exc}"}
        state = "available" if info["available"] else "unavailable"
        devs = ", ".join(map(str, info.get("devices", []))) or "-"
        click.echo(f"{name:8s} {state:11s} devices: {devs}  ({info.get('reason', '')})")


COMMANDS = [devices]
