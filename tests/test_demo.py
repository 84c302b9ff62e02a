"""`pandasync demo`, the README's first command, runs end to end and shows the rows arrive."""

import os
import subprocess
import sys

import pytest


@pytest.mark.timeout(120)
def test_the_demo_shows_couchdb_webhook_and_snapshot_changes_arriving_in_panda() -> None:
    env = {name: value for name, value in os.environ.items() if not name.startswith("PANDASYNC")}
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "demo"],
        capture_output=True,
        text=True,
        timeout=110,
        env={**env, "COLUMNS": "120"},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "River floods (update)" in done.stdout
    assert "This one gets deleted" in done.stdout.split("4. live changes")[0]
    assert "This one gets deleted" not in done.stdout.split("4. live changes")[1]
    assert "POST /webhooks/tips → 202" in done.stdout
    assert "Bridge closed again?" in done.stdout
    assert "pending 0, dead letters 0" in done.stdout
    tutorial = done.stdout.split("6. no changelog")[1]
    assert "Lost dog near the park" in tutorial.split("t5 removed")[0]
    assert "Lost dog near the park" not in tutorial.split("t5 removed")[1]
    assert "Main St open again" in tutorial
    # One upsert and one delete reach PANDA; the three unchanged rows cost nothing.
    assert "PANDA writes for that snapshot: 2 " in tutorial
