"""The deployment files: the systemd unit, checked by `systemd-analyze
verify` and by running its own command lines (start, check, reload) the
way systemd would."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

from harness import Gateway, gateway_binary, org, running, wait_until

UNIT = Path(__file__).resolve().parents[2] / "deploy" / "systemd" / "ratatosk.service"


def exec_lines(unit: str, key: str) -> list[list[str]]:
    """The command lines of `key=` (ExecStart, ExecReload, ...), in order."""
    return [shlex.split(line.split("=", 1)[1]) for line in unit.splitlines() if line.startswith(f"{key}=")]


def generation(gw: Gateway) -> int:
    return gw.admin_get("/readyz").json()["config"]["generation"]


def test_the_systemd_unit_verifies_and_its_commands_start_check_and_reload_the_gateway(tmp_path, log_dir, replicas):
    gw = Gateway(log_dir / "deploy-unit", {"org-1": org(replicas)}, name="deploy-unit")
    # The unit as installed, with this build and this test's config in
    # place of /usr/local/bin and /etc.
    text = (UNIT.read_text().replace("/usr/local/bin/ratatosk", str(gateway_binary()))
            .replace("/etc/ratatosk/gateway.yaml", str(gw.config_path)))
    unit = tmp_path / "ratatosk.service"
    unit.write_text(text)
    verified = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and not (verified.stdout + verified.stderr).strip(), verified

    # EnvironmentFile= gives the secrets; the harness's env stands in for it.
    env = {**os.environ, **gw.env}
    [check] = exec_lines(text, "ExecStartPre")
    checked = subprocess.run(check, env=env, capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0 and ": ok (1 org: org-1)" in checked.stdout, checked
    [start] = exec_lines(text, "ExecStart")
    assert start[0] == str(gateway_binary())
    gw.argv = start
    with running(gw):
        assert generation(gw) == 1
        reloads = exec_lines(text, "ExecReload")
        assert [r[0] for r in reloads] == [str(gateway_binary()), "/bin/kill"], reloads

        def reload() -> list[subprocess.CompletedProcess]:
            """ExecReload's lines in order, stopping at the first failure, as
            systemd runs them ($MAINPID is the gateway's pid)."""
            done = []
            for line in reloads:
                done.append(subprocess.run([a.replace("$MAINPID", str(gw.pid)) for a in line], env=env,
                                           capture_output=True, text=True, timeout=60))
                if done[-1].returncode != 0:
                    break
            return done

        assert [r.returncode for r in reload()] == [0, 0]
        wait_until("the reload by SIGHUP", lambda: generation(gw) == 2, timeout=10)

        # A broken file fails `systemctl reload` at its check, before any
        # signal: the gateway keeps its generation.
        good = dict(gw.config)
        gw.config = {**good, "orgs": {"org-1": {"upstream": {"replicas": ["not a url"]}}}}
        gw.write_config()
        failed = reload()
        assert len(failed) == 1 and failed[0].returncode != 0, failed
        assert "orgs.org-1.upstream" in failed[0].stderr, failed[0].stderr
        assert generation(gw) == 2
        gw.config = good
        gw.write_config()
