"""The consortium side of issue 16, in this session's Ray: remote hospitals and the AXL path.

* ``RunConfig.remote_hospitals``: no hospital actor is started; setup waits for the roster's
  hospitals through the AXL front and names the ones that never answered.
* ``RunConfig.hospital_transport = "axl"`` (what ``bench rounds --transport axl`` runs): the
  hospital actors are reached only through the front's HTTP API, and rounds still close.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from medimesh.errors import ConfigError
from medimesh.keys import add_member, new_key

pytestmark = pytest.mark.ray


def test_rounds_close_with_every_hospital_behind_the_axl_front(ray_session: None) -> None:
    from medimesh.actors.runtime import Consortium, RunConfig

    fed = Consortium(RunConfig(hospitals=3, rounds=2, seed=1, hospital_transport="axl",
                               round_timeout_s=20.0))
    try:
        fed.start()
        history = fed.run()
        stats = fed.router_stats()
        # TLS whose certificate carries the roster's router key (what every client pins).
        assert fed.front is not None and fed.front.url.startswith("https://127.0.0.1:")
        assert fed.front.pin == fed.roster.with_role("router")[0].peer_id
        audit = fed.verify_audit()
    finally:
        fed.shutdown()
    assert [m["accepted"] for m in history] == [3, 3]
    hospitals = {i["peer_id"] for i in fed.hospital_info}
    # The router pushed nothing to them: everything they got came out of their mailboxes.
    assert all(stats["peers"][p]["msgs_in"] >= 3 for p in hospitals)
    assert audit["ok"]
    with pytest.raises(httpx.HTTPError):  # the front stopped with the consortium
        httpx.get(fed.front.url if fed.front else "http://127.0.0.1:1", timeout=2)


def test_setup_names_the_remote_hospital_that_never_answered(
    ray_session: None, tmp_path: Path
) -> None:
    from medimesh.actors.runtime import Consortium, RunConfig
    from medimesh.data.sparse import SparseConfig, spec_dict
    from medimesh.identity import Identity
    from medimesh.keys import load_key
    from medimesh.signed_roster import sign_all

    keys, roster = tmp_path / "keys", tmp_path / "roster.json"
    ids: list[Identity] = []
    for name in ("router", "auditor", "validator", "coordinator"):
        made = new_key(name, keys)
        add_member(roster, name, name, made.peer_id)
        ids.append(load_key(made.key_file))
    for name in ("north", "south"):
        made = new_key(name, tmp_path / name)
        add_member(roster, name, "hospital", made.peer_id)
        ids.append(load_key(made.key_file))
    from medimesh.keys import load_roster

    roster.write_text(sign_all(load_roster(roster), ids))
    spec = spec_dict(SparseConfig(n_hospitals=2, n_features=40, n_classes=5))
    cfg = RunConfig(dataset="csv", spec=json.loads(json.dumps(spec)),
                    remote_hospitals=("north", "south"), keys_dir=str(keys),
                    roster_file=str(roster), setup_timeout_s=2.0)
    fed = Consortium(cfg)
    with pytest.raises(ConfigError, match=r"no answer within 2 s from north, south"):
        fed.start()
    assert fed.handles == {} and fed.front is None


def test_remote_hospitals_need_a_signed_roster_and_no_local_sites(tmp_path: Path) -> None:
    from medimesh.actors.runtime import RunConfig

    with pytest.raises(ConfigError, match="--keys"):
        RunConfig(dataset="csv", spec={}, remote_hospitals=("a",))
    with pytest.raises(ConfigError, match="no local --site"):
        RunConfig(dataset="csv", spec={}, remote_hospitals=("a",), keys_dir="k",
                  roster_file="r", csv_sites=(("b", "b.csv"),))
    with pytest.raises(ConfigError, match="'ray' or 'axl'"):
        RunConfig(hospital_transport="grpc")
