"""Artifacts: the PUT endpoint, the run's JSON, the artifact pages and the diff viewer."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from runs import views
from runs.diffs import parse_unified_diff
from runs.models import Artifact, Run
from tests.conftest import ndjson, record

PATCH = b"""From 1a2b3c Mon Sep 17 00:00:00 2001
Subject: [PATCH] Greet the world

---
 README.md | 3 ++-
 1 file changed

diff --git a/README.md b/README.md
index 83db48f..bf269f4 100644
--- a/README.md
+++ b/README.md
@@ -1,4 +1,5 @@
 # Hello
-old line
+new line
+-- a line that starts with two dashes
 keep
\\ No newline at end of file
diff --git a/src/old.py b/src/new.py
similarity index 90%
rename from src/old.py
rename to src/new.py
--- a/src/old.py
+++ b/src/new.py
@@ -10,2 +10,2 @@ def main():
--- a removed line that looks like a header
+print("<script>alert(1)</script>")
 return 0
diff --git a/logo.png b/logo.png
new file mode 100644
index 0000000..e69de29
Binary files /dev/null and b/logo.png differ
"""


def put(client, token, run_id: str, name: str, body: bytes, **extra):
    headers = {"HTTP_AUTHORIZATION": f"Bearer {token}"}
    headers.update(extra)
    content_type = headers.pop("content_type", "application/octet-stream")
    return client.put(
        f"/api/runs/{run_id}/artifacts/{name}", body, content_type=content_type, **headers
    )


# --- The endpoint -------------------------------------------------------------------


def test_it_stores_an_artifact_with_size_type_and_sha256(client, token, post_events):
    post_events(ndjson(record("run.begin")), run_id="r1")
    response = put(client, token, "r1", "diff.patch", PATCH, content_type="text/x-diff")
    assert response.status_code == 201
    assert response.json() == {
        "run_id": "r1",
        "name": "diff.patch",
        "size": len(PATCH),
        "content_type": "text/x-diff",
        "sha256": hashlib.sha256(PATCH).hexdigest(),
    }
    artifact = Artifact.objects.get()
    assert bytes(artifact.content) == PATCH
    assert artifact.run == Run.objects.get(run_id="r1")


def test_a_second_put_replaces_the_artifact(client, token):
    put(client, token, "r1", "summary.md", b"first", content_type="text/markdown")
    response = put(client, token, "r1", "summary.md", b"second version")
    assert response.status_code == 201
    artifact = Artifact.objects.get()
    assert bytes(artifact.content) == b"second version"
    assert artifact.size == 14
    assert artifact.content_type == "text/markdown"  # octet-stream: guessed from the name


def test_it_refuses_an_artifact_over_the_limit_with_413(client, token, settings):
    settings.ARTIFACT_MAX_BYTES = 1024
    response = put(client, token, "r1", "big.bin", b"x" * 2000)
    assert response.status_code == 413
    assert "1024" in response.json()["detail"]
    bomb = gzip.compress(b"\0" * 1_000_000)
    response = put(client, token, "r1", "bomb.bin", bomb, HTTP_CONTENT_ENCODING="gzip")
    assert response.status_code == 413  # the limit counts decompressed bytes
    assert not Artifact.objects.exists()
    assert put(client, token, "r1", "ok.bin", b"x" * 1024).status_code == 201


def test_it_takes_artifacts_larger_than_djangos_upload_limit(client, token, settings):
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1000  # read as a stream: this must not decide
    assert put(client, token, "r1", "log.txt", b"y" * 5000).status_code == 201


def test_a_gzip_body_is_stored_decompressed(client, token):
    body = b"line\n" * 100
    response = put(
        client, token, "r1", "out.log", gzip.compress(body), HTTP_CONTENT_ENCODING="gzip"
    )
    assert response.status_code == 201
    assert response.json()["sha256"] == hashlib.sha256(body).hexdigest()


def test_it_guesses_the_type_from_the_name_and_drops_parameters(client, token):
    put(client, token, "r1", "a.patch", b"x")
    put(client, token, "r1", "b.txt", b"x", content_type="text/plain; charset=utf-8")
    put(client, token, "r1", "c", b"x", content_type="not a type")
    types = dict(Artifact.objects.values_list("name", "content_type"))
    assert types == {
        "a.patch": "text/x-diff",
        "b.txt": "text/plain",
        "c": "application/octet-stream",
    }


def test_it_needs_a_project_token(client, operator_client):
    assert client.put("/api/runs/r1/artifacts/a.txt", b"x").status_code == 401
    # An operator's session reads, but uploads are for agents with a token.
    assert operator_client.put("/api/runs/r1/artifacts/a.txt", b"x").status_code in (401, 403)
    assert not Artifact.objects.exists()


@pytest.mark.parametrize("name", ["..", ".", "a%01b", "x" * 256])
def test_it_refuses_names_that_are_not_one_plain_segment(client, token, name):
    response = put(client, token, "r1", name, b"x")
    assert response.status_code in (400, 404)
    assert not Artifact.objects.exists()


def test_a_token_only_ever_writes_to_its_own_projects_runs(client, token, stranger, post_events):
    other, their_token = stranger
    post_events(ndjson(record("run.begin")), run_id="shared", auth=their_token)
    assert put(client, token, "shared", "a.txt", b"ours").status_code == 201
    theirs = Run.objects.get(project=other, run_id="shared")
    assert not theirs.artifacts.exists()
    assert Run.objects.get(project__slug="acme", run_id="shared").artifacts.count() == 1


def test_an_artifact_may_arrive_before_the_runs_events(client, token, post_events):
    assert put(client, token, "early", "prompt.txt", b"hi").status_code == 201
    post_events(ndjson(record("run.begin", slug="o__r")), run_id="early")
    run = Run.objects.get(run_id="early")
    assert run.slug == "o__r" and run.artifacts.count() == 1


def test_the_run_json_lists_artifacts(client, token, post_events):
    post_events(ndjson(record("run.begin")), run_id="r1")
    put(client, token, "r1", "b.txt", b"bee", content_type="text/plain")
    put(client, token, "r1", "a.bin", b"\x00\x01")
    detail = client.get("/api/runs/r1", HTTP_AUTHORIZATION=f"Bearer {token}").json()
    assert detail["artifacts"] == [
        {
            "name": "a.bin",
            "size": 2,
            "content_type": "application/octet-stream",
            "sha256": hashlib.sha256(b"\x00\x01").hexdigest(),
        },
        {
            "name": "b.txt",
            "size": 3,
            "content_type": "text/plain",
            "sha256": hashlib.sha256(b"bee").hexdigest(),
        },
    ]


def test_deleting_a_run_deletes_its_artifacts(client, token, post_events):
    from runs.retention import delete_runs

    post_events(ndjson(record("run.begin")), run_id="r1")
    put(client, token, "r1", "a.txt", b"x")
    delete_runs([Run.objects.get().pk])
    assert not Artifact.objects.exists()


# --- Pages ---------------------------------------------------------------------------


@pytest.fixture
def run(post_events) -> Run:
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="r1")
    return Run.objects.get()


def test_the_run_page_lists_artifacts_with_view_and_download_links(operator_client, run):
    text = Artifact.store(run, "notes.txt", b"hello", "text/plain")
    binary = Artifact.store(run, "core.dump", b"\x7fELF\x00", "application/octet-stream")
    body = operator_client.get("/runs/r1").content.decode()
    assert f'<a href="/artifacts/{text.pk}/">notes.txt</a>' in body
    assert f'href="/artifacts/{binary.pk}/download" download' in body
    assert f'<a href="/artifacts/{binary.pk}/">' not in body  # binary: download only
    assert text.sha256[:11] in body


def test_a_text_artifact_is_shown_inline_and_escaped(operator_client, run):
    artifact = Artifact.store(run, "prompt.txt", b"Say <b>hi</b>\nline 2", "text/plain")
    body = operator_client.get(f"/artifacts/{artifact.pk}/").content.decode()
    assert '<pre class="text">Say &lt;b&gt;hi&lt;/b&gt;\nline 2</pre>' in body
    assert "<title>prompt.txt · octocat__hello-world · Runlens</title>" in body


def test_a_patch_gets_a_diff_view_with_files_hunks_and_line_numbers(operator_client, run):
    artifact = Artifact.store(run, "diff.patch", PATCH, "text/x-diff")
    body = operator_client.get(f"/artifacts/{artifact.pk}/").content.decode()
    assert "in 3 files" in body
    assert '<span class="file-status modified">modified</span> <code>README.md</code>' in body
    assert '<span class="file-status renamed">renamed</span> <code>src/new.py</code>' in body
    assert '<span class="file-status added">added</span> <code>logo.png</code>' in body
    assert "Binary files /dev/null and b/logo.png differ" in body
    assert (
        '<tr class="del"><td class="ln">2</td><td class="ln"></td><td class="code">old line</td>'
        in (body)
    )
    assert (
        '<tr class="add"><td class="ln"></td><td class="ln">2</td><td class="code">new line</td>'
        in (body)
    )
    assert (
        '<tr class="context"><td class="ln">3</td><td class="ln">4</td><td class="code">keep'
        in (body)
    )
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body and "<script>alert" not in body
    assert "Subject: [PATCH] Greet the world" in body  # the mail header, as text


def test_a_binary_artifact_is_offered_as_a_download(operator_client, run):
    artifact = Artifact.store(run, "model.bin", b"\x00\x01\x02", "application/octet-stream")
    body = operator_client.get(f"/artifacts/{artifact.pk}/").content.decode()
    assert "A binary file" in body
    response = operator_client.get(f"/artifacts/{artifact.pk}/download")
    assert response.content == b"\x00\x01\x02"
    assert response["Content-Disposition"] == 'attachment; filename="model.bin"'


def test_a_text_named_file_that_is_not_utf8_is_treated_as_binary(operator_client, run):
    artifact = Artifact.store(run, "odd.txt", b"\xff\xfe\x00bad", "text/plain")
    assert "A binary file" in operator_client.get(f"/artifacts/{artifact.pk}/").content.decode()


def test_a_large_text_artifact_is_not_inlined(operator_client, run, monkeypatch):
    monkeypatch.setattr(views, "INLINE_MAX_BYTES", 10)
    artifact = Artifact.store(run, "big.log", b"z" * 11, "text/plain")
    body = operator_client.get(f"/artifacts/{artifact.pk}/").content.decode()
    assert "zzzzzzzzzzz" not in body and "download it" in body


def test_the_download_never_serves_active_content_as_such(operator_client, run):
    artifact = Artifact.store(run, "report.html", b"<script>alert(1)</script>", "text/html")
    response = operator_client.get(f"/artifacts/{artifact.pk}/download")
    assert response["Content-Type"] == "application/octet-stream"
    assert response["Content-Disposition"].startswith("attachment;")
    assert "sandbox" in response["Content-Security-Policy"]
    assert response["X-Content-Type-Options"] == "nosniff"


def test_compare_diffs_same_named_text_artifacts(operator_client, post_events):
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="a")
    post_events(ndjson(record("run.begin"), record("run.exit_clean")), run_id="b")
    a, b = Run.objects.get(run_id="a"), Run.objects.get(run_id="b")
    Artifact.store(a, "plan.md", b"step 1\nstep 2\n", "text/markdown")
    Artifact.store(b, "plan.md", b"step 1\nstep 2b\nstep 3\n", "text/markdown")
    Artifact.store(a, "same.txt", b"x", "text/plain")
    Artifact.store(b, "same.txt", b"x", "text/plain")
    Artifact.store(a, "only-a.txt", b"x", "text/plain")
    body = operator_client.get(f"/compare/?run={a.pk}&run={b.pk}").content.decode()
    plan = body[body.index("<h3>plan.md") :].split('<div class="compare-artifact">')[0]
    assert "differs" in plan
    assert (
        '<tr class="del"><td class="ln">2</td><td class="ln"></td><td class="code">step 2</td>'
        in (plan)
    )
    assert '<td class="ln">3</td><td class="code">step 3</td>' in plan
    assert 'id="cmp' in plan  # file anchors unique on the page
    same = body[body.index("<h3>same.txt") :].split("</h3>")[0]
    assert "identical" in same
    assert "only in A" in body[body.index("<h3>only-a.txt") :].split("</h3>")[0]


# --- The diff parser -----------------------------------------------------------------


def test_the_parser_uses_hunk_counts_to_tell_lines_from_headers():
    diff = parse_unified_diff(PATCH.decode())
    readme, renamed, logo = diff.files
    assert (readme.added, readme.removed) == (2, 1)
    assert [line.kind for line in readme.hunks[0].lines] == [
        "context",
        "del",
        "add",
        "add",
        "context",
        "note",
    ]
    assert readme.hunks[0].lines[3].text == "-- a line that starts with two dashes"
    assert (renamed.old_path, renamed.new_path, renamed.status) == (
        "src/old.py",
        "src/new.py",
        "renamed",
    )
    assert renamed.hunks[0].section == "def main():"
    assert renamed.hunks[0].lines[0].kind == "del" and renamed.hunks[0].lines[0].old_no == 10
    assert logo.status == "added" and not logo.hunks and "Binary files" in logo.notes[-1]
    assert diff.preamble.startswith("From 1a2b3c")


def test_the_parser_reads_plain_diff_u_output():
    text = "--- a.txt\t2026-01-01\n+++ b.txt\t2026-01-02\n@@ -1 +1 @@\n-a\n+b\n"
    (only,) = parse_unified_diff(text).files
    assert (only.old_path, only.new_path) == ("a.txt", "b.txt")
    assert [(line.kind, line.old_no, line.new_no) for line in only.hunks[0].lines] == [
        ("del", 1, None),
        ("add", None, 1),
    ]


def test_the_parser_survives_garbage():
    diff = parse_unified_diff("not a diff at all\n@@ nonsense @@\n+++\n---\n")
    assert diff.files == [] and "not a diff" in diff.preamble
