"""``paylab certs``: a lab CA and a certificate per service, for TLS links."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from shared.cli.console import fail, out


def certs(
    out_dir: Annotated[
        Path, typer.Option("--out", help="Directory of the files (default ./var/tls).")
    ] = Path("var/tls"),
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="Extra DNS name or IP in every certificate (repeatable)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace existing files.")] = False,
) -> None:
    """Make a lab CA, a certificate per service and a terminal client certificate for TLS
    links (PAYLAB_TLS_ENABLED=true); each names its identity (service or terminal) in its
    common name, which mutual TLS listeners check (PAYLAB_TLS_CLIENTS_<SERVICE>)."""
    from shared.net.certs import CertsExist, lab_pki, write_lab_pki

    try:
        written = write_lab_pki(out_dir, lab_pki(host or ()), force=force)
    except CertsExist as exc:
        fail(str(exc))
    except (OSError, ValueError) as exc:
        fail(f"cannot write certificates: {exc}")
    for path in written:
        out.print(str(path))
    out.print(f"turn TLS on with PAYLAB_TLS_ENABLED=true PAYLAB_TLS_DIR={out_dir}")
