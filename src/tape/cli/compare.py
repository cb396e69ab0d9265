"""`tape compare`: every policy on the same trace, one table (and files with --out)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from tape import __version__
from tape.api import place
from tape.cli.common import (
    JsonOption,
    OverwriteOption,
    check_program_file,
    console,
    error_console,
    escape,
    flag_names,
    handles_errors,
    output_folder,
    parse_out,
    prepare,
    progress_bar,
    sandbox_isolation,
)
from tape.cli.formatting import format_value
from tape.cli.options import with_settings
from tape.cli.profile_option import ProfileOption, check_profile_folder, write_profiles
from tape.errors import ProgramError
from tape.files import to_json_text
from tape.policies import PolicyError, parse_policy_spec, policy_names
from tape.protocol import score_program
from tape.report import compare_policies, summarize, write_comparison
from tape.settings import Settings, Setup

__all__ = ["DEFAULT_POLICIES", "register"]

DEFAULT_POLICIES = ("vanilla", "deepseek", "bldm", "replicate-hot", "min-moves", "tape")

# Rows of the comparison table: (section, [(metric key, label, scale)]). Labels (18 characters
# at most, indented) fit one line at 80 columns beside six policies of 8-character numbers.
# IB: inter-node (InfiniBand); NVLink: intra-node.
_ROWS = (
    ("balance", (
        ("balancedness_score", "slot balance", 1),
        ("gpu_balancedness", "GPU balance", 1),
        ("overall_balancedness", "overall balance", 1),
    )),
    ("combined score", (
        ("combined_score_v0", "seed v0", 1),
        ("combined_score_v2", "seed v2", 1),
        ("combined_score_v3", "seed v3", 1),
        ("combined_score_v4", "seed v4", 1),
        ("combined_score_realistic", "realistic", 1),
    )),
    ("per rebalance", (
        ("moved_experts", "moved experts", 1),
        ("changed_slots", "changed slots", 1),
        ("ib_copies", "IB copies", 1),
        ("migration_seconds", "migration ms", 1e3),
    )),
    ("per window", (
        ("ib_tokens", "IB tokens", 1),
        ("ib_tokens_over_bound", "IB / fewest", 1),
        ("nvlink_tokens", "NVLink tokens", 1),
        ("step_time_s", "step time ms", 1e3),
    )),
    ("against deepseek", (
        ("gpu_balancedness_gain", "GPU balance gain", 1),
        ("moved_experts_ratio", "moves ratio", 1),
        ("ib_tokens_ratio", "IB tokens ratio", 1),
        ("step_time_ratio", "step time ratio", 1),
        ("runtime_ratio", "runtime ratio", 1),
    )),
    ("policy runtime ms", (
        ("runtime_mean_ms", "mean", 1),
        ("runtime_std_ms", "std", 1),
        ("runtime_min_ms", "min", 1),
        ("runtime_max_ms", "max", 1),
    )),
)


def _parse_policies(text: str | None) -> list[str]:
    if text is None:
        available = set(policy_names())
        return [name for name in DEFAULT_POLICIES if name in available]
    names = [name.strip() for name in text.split(",") if name.strip()]
    if not names:
        raise PolicyError("--policies is empty; give names separated by commas")
    for name in names:
        parse_policy_spec(name)  # raises PolicyError naming the known policies
    return list(dict.fromkeys(names))


def _program_labels(programs: list[Path], policies: list[str]) -> dict[str, Path]:
    """Each --program's column label, its file name; ProgramError for a file that is not a
    program, or two programs (or a program and a policy) of one name. A file given twice is one
    column, as a policy named twice."""
    labels: dict[str, Path] = {}
    for program in programs:
        check_program_file(program)
        if program.name in labels and labels[program.name].resolve() == program.resolve():
            continue
        if program.name in labels or program.name in policies:
            raise ProgramError(f"two columns would be named {program.name!r}; rename the "
                               f"program {program}")
        labels[program.name] = program
    return labels


def _usable_policies(specs: list[str], setup: Setup, named: bool
                     ) -> tuple[list[str], dict[str, str]]:
    """The policies that can place the first window, and why each other one cannot.

    One call each, before the comparison runs: a bad parameter, or a policy that cannot handle
    the layout, would otherwise end a long run at its turn. A policy the user named (`named`)
    that fails is an error (PolicyError); a default one is skipped, with the reason. An error
    too when no policy is left.
    """
    usable: list[str] = []
    skipped: dict[str, str] = {}
    for spec in specs:
        name, params = parse_policy_spec(spec)
        try:
            place(setup.windows[0], setup.layout, name, **params)
        except PolicyError as error:
            if named:
                raise
            skipped[spec] = flag_names(str(error))
        else:
            usable.append(spec)
    if not usable:
        reasons = "; ".join(f"{spec}: {reason}" for spec, reason in skipped.items())
        raise PolicyError(f"no built-in policy can place this layout ({reasons})")
    return usable, skipped


def register(app: typer.Typer) -> None:
    """Add `compare` to `app`."""

    @app.command()
    @handles_errors
    @with_settings()
    def compare(
        settings: Settings,
        policies: Annotated[
            str | None,
            typer.Option("--policies", help="Comma-separated policies (default: all built-in "
                         "ones), each a name, then :PRESET or :KEY=VALUE parameters, for "
                         "example: deepseek, tape:fast, tape:migration_weight=0.1 (a preset or "
                         "parameters of tape)."),
        ] = None,
        programs: Annotated[
            list[Path] | None,
            typer.Option("--program", metavar="<path>",
                         help="A program file defining rebalance_experts (as tape evaluate "
                         "takes), scored sandboxed (--timeout, --memory-mb) in a column named "
                         "by its file name beside the policies; repeat for more. One that "
                         "fails makes the exit code 1."),
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option("--out", parser=parse_out, metavar="<path>",
                         help="Write here, per policy, GPU-load CSVs, heatmaps, box "
                         "plots and timelines; over all, a per-window CSV and plot, a JSON of "
                         "everything and a manifest."),
        ] = None,
        as_json: JsonOption = False,
        overwrite: OverwriteOption = False,
        profile: ProfileOption = None,
    ) -> None:
        """Compare placement policies under the protocol, side by side.

        Without options: every built-in policy on the built-in synthetic trace of the --model.
        """
        names = _parse_policies(policies)
        labels = _program_labels(programs or [], names)
        version_value, dispatch, seed = settings.version, settings.dispatch, settings.seed
        isolation = sandbox_isolation(settings.isolation) if labels else settings.isolation
        check_profile_folder(profile, out, overwrite)
        with output_folder(out, overwrite) as staging:
            setup = prepare(settings, show_progress=not as_json)
            names, skipped = _usable_policies(names, setup, named=policies is not None)
            for spec, reason in skipped.items():
                error_console.print(f"note: skipped {spec}: {reason}", markup=False,
                                    highlight=False, soft_wrap=True)
            pairs = setup.windows.shape[0] - 1
            # one step a window pair of each column (the policies' warm-up calls advance none)
            with progress_bar("policies x window pairs", (len(names) + len(labels)) * pairs,
                              not as_json) as advance:
                results = compare_policies(
                    names, setup.windows, setup.layout, version=version_value,
                    model=setup.model, cluster=setup.cluster, dispatch=dispatch,
                    steps_per_window=setup.window_steps, progress=advance,
                )
                for label, program in labels.items():
                    results[label] = score_program(
                        program, setup.windows, setup.layout, version=version_value,
                        timeout_s=settings.timeout_s, memory_mb=settings.memory_mb,
                        budget_s=settings.budget_s,
                        isolation=isolation, model=setup.model,
                        cluster=setup.cluster, dispatch=dispatch,
                        steps_per_window=setup.window_steps, progress=advance,
                    )
            profiles = None
            if profile is not None:
                profiles = write_profiles(profile, names, setup,
                                          {"seed": seed, "policies": names, **setup.manifest()})
            if staging is not None:
                manifest = {"command": "compare", "tape_version": __version__, "seed": seed,
                            "version": version_value, "policies": names, "skipped": skipped,
                            "programs": {label: str(path) for label, path in labels.items()},
                            "isolation": {label: results[label].isolation for label in labels},
                            **setup.manifest(),
                            **({} if profiles is None else {"profiles": profiles})}
                written = write_comparison(
                    staging, results, setup.windows, setup.layout, model=setup.model,
                    cluster=setup.cluster, dispatch=dispatch,
                    steps_per_window=setup.window_steps, manifest=manifest,
                )
        summary = summarize(results)
        # as `tape evaluate` on a failing program: the table shows why, the exit code says so
        failed = any(results[label].error for label in labels)
        if as_json:
            isolations = {label: results[label].isolation for label in labels}
            typer.echo(to_json_text({"trace": setup.described, "version": version_value,
                                     "policies": summary, "skipped": skipped,
                                     **({"isolation": isolations} if labels else {}),
                                     **({} if profiles is None else {"profiles": profiles})}))
            if failed:
                raise typer.Exit(1)
            return
        console.print(f"[dim]{escape(setup.described)}; {escape(setup.setting())}[/]",
                      highlight=False)
        console.print(_table(summary, version_value, f"{setup.model.name} on {setup.cluster.name}"))
        if out is not None:
            console.print(f"wrote {len(written)} files to {out}", markup=False, highlight=False,
                          soft_wrap=True)  # a long path stays on one line, to copy
        if profiles is not None:
            console.print(f"wrote the profiles of {len(profiles)} policies to {profile}",
                          markup=False, highlight=False, soft_wrap=True)
        if failed:
            raise typer.Exit(1)


def _table(summary: dict[str, dict], version: int | str, setting: str = "deepseek-v3 on h800"
           ) -> Table:
    """Metrics down, policies across (the table stays narrow however many metrics); first the
    combined score of the chosen `version`, in bold; the title names the model and cluster
    (`setting`)."""
    table = Table(title=f"{setting}: policies under the protocol (means over window pairs)",
                  box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 0, 0, 1))
    # Labels fit at 80 columns (they would wrap in a narrower terminal); numbers are never cut;
    # a header breaks after each '-' and ':' of its policy ("tape:fast" over two lines).
    table.add_column("metric", min_width=12)
    for name in summary:
        header = name.replace("-", "-\n").replace(":", ":\n")
        table.add_column(header, justify="right", no_wrap=True, min_width=6)
    label = f"score (v{version})" if isinstance(version, int) else f"score ({version})"
    table.add_row(f"[bold]{label}[/]", *(
        f"[bold]{format_value(values['combined_score'], digits=3)}[/]"
        if "combined_score" in values else "-" for values in summary.values()
    ))
    for section, rows in _ROWS:
        if not any(key in values for key, _, _ in rows for values in summary.values()):
            continue
        table.add_row(f"[bold]{section}[/]", *("" for _ in summary))
        for key, label, scale in rows:
            if not any(key in values for values in summary.values()):
                continue  # as tape place: no IB / fewest row under uniform dispatch
            table.add_row(f"  {label}", *(
                format_value(values[key] * scale, digits=3) if key in values else "-"
                for values in summary.values()
            ))
    errors = [f"{name}: {values['error']}" for name, values in summary.items() if values["error"]]
    if errors:
        table.caption = escape("errors: " + "; ".join(errors))
    return table
