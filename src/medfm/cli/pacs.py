"""CLI: `medfm pacs ...` — pull studies from a DICOMweb PACS, watch one and write results back, sandbox."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="PACS over DICOMweb: pull studies, watch a PACS and store model results (SR, SEG, overlay) back "
    "into each study, or start a private Orthanc sandbox. Credentials: --user/--password (or "
    "MEDFM_PACS_USER / MEDFM_PACS_PASSWORD, which keep the password out of the process list) or --token.",
    no_args_is_help=True,
)

URL_HELP = "DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web."
_USER = typer.Option(None, "--user", envvar="MEDFM_PACS_USER", help="User for HTTP basic authentication.")
_PASSWORD = typer.Option(None, "--password", envvar="MEDFM_PACS_PASSWORD",
                         help="Password (prefer the MEDFM_PACS_PASSWORD environment variable).")
_TOKEN = typer.Option(None, "--token", envvar="MEDFM_PACS_TOKEN",
                      help="Bearer token instead of user/password.")
_TIMEOUT = typer.Option(10.0, "--timeout", help="Seconds to wait for each PACS request.")


def _pacs(url: str, user: str | None, password: str | None, token: str | None, timeout: float):  # noqa: ANN202
    from medfm.pacs.client import Pacs

    return Pacs(url, user=user, password=password, token=token, timeout=timeout)


@app.command("pull")
def pull_cmd(
    url: str = typer.Argument(..., help=URL_HELP),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for the .dcm files (st_*/se_*/i_*.dcm)."),
    study: str | None = typer.Option(None, "--study", help="Only this Study Instance UID."),
    since: str | None = typer.Option(None, "--since", help="Only studies dated on or after YYYYMMDD."),
    user: str | None = _USER,
    password: str | None = _PASSWORD,
    token: str | None = _TOKEN,
    timeout: float = _TIMEOUT,
) -> None:
    """Download studies as DICOM files named by hashed UIDs (no patient names in paths); a rerun resumes."""
    from medfm.pacs.watch import pull

    paths = pull(_pacs(url, user, password, token, timeout), out, study=study, since=since, log=typer.echo)
    typer.echo(f"{len(paths)} instances in {out}")


@app.command("watch")
def watch_cmd(
    url: str = typer.Argument(..., help=URL_HELP),
    runs: list[Path] = typer.Argument(..., help="Runs or exported models to apply (as `medfm serve` takes)."),
    state: Path = typer.Option(..., "--state", help="Folder for the watcher's progress and outbox."),
    poll: float = typer.Option(2.0, "--poll", help="Seconds between polls of the PACS."),
    once: bool = typer.Option(False, "--once", help="One poll and delivery pass, then exit."),
    no_overlay: bool = typer.Option(False, "--no-overlay", help="Store SR and SEG only, no overlay image."),
    user: str | None = _USER,
    password: str | None = _PASSWORD,
    token: str | None = _TOKEN,
    timeout: float = _TIMEOUT,
) -> None:
    """Analyse each new image on the PACS and store the results back into its study.

    Findings go back as a structured report (SR), masks as a segmentation (SEG) and an overlay image
    (secondary capture). Results wait in an outbox under --state while the PACS is down; a restart
    carries on where it stopped. Stop with Ctrl-C.
    """
    from medfm.pacs.watch import Watcher
    from medfm.serve.engine import Engine

    engine = Engine.load([str(r) for r in runs])
    watcher = Watcher(_pacs(url, user, password, token, timeout), engine.analyse_dicom, state, poll_s=poll,
                      overlay=not no_overlay, log=typer.echo)
    if once:
        s = watcher.run_once()
        typer.echo(f"{s['new']} new, {s['processed']} analysed, {s['delivered']} delivered, "
                   f"{s['queued']} queued, {s['errors']} errors")
        return
    typer.echo(f"watching {watcher.pacs.url} every {poll:g} s (Ctrl-C stops)")
    try:
        totals = watcher.run()
    except KeyboardInterrupt:
        typer.echo("stopped")
        return
    typer.echo(f"{totals['processed']} analysed, {totals['delivered']} delivered")


@app.command("sandbox")
def sandbox_cmd(
    storage: Path | None = typer.Option(
        None, "--storage", help="Keep the database here (default: a temporary folder, deleted on exit)."
    ),
    port: int = typer.Option(0, "--port", help="HTTP port on 127.0.0.1 (0: a free one)."),
) -> None:
    """Start a private Orthanc PACS on 127.0.0.1 (DICOMweb, generated password) until Ctrl-C."""
    import signal
    import threading

    from medfm.pacs.orthanc import Orthanc

    def _interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)  # `kill` must also stop Orthanc and remove its storage
    with Orthanc(storage_dir=storage, port=port or None) as orthanc:
        user, password = orthanc.auth
        typer.echo(f"Orthanc DICOMweb: {orthanc.url}\nuser: {user}\npassword: {password}\n"
                   f"try: MEDFM_PACS_USER={user} MEDFM_PACS_PASSWORD='{password}' medfm pacs pull "
                   f"{orthanc.url} --out pulled/\nCtrl-C stops it.")
        try:
            threading.Event().wait()
        except KeyboardInterrupt:
            typer.echo("stopping")


def register(main: typer.Typer) -> None:
    """Add `pacs` to the main app."""
    main.add_typer(app, name="pacs")

