"""Redaction: credential-looking environment values and well-known key formats never pass through."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rloopd.redact import Redactor

OPENAI = "sk-proj-" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4z"
ANTHROPIC = "sk-ant-api03-" + "x" * 40


def test_environment_secrets_are_replaced_by_their_name():
    r = Redactor({"MY_SERVICE_TOKEN": "hunter2hunter2", "PORT": "8080", "HOME": "/home/a", "SHORT_KEY": "abc"})
    out = r.redact_text("token=hunter2hunter2 port=8080 home=/home/a key=abc")
    assert out == "token=[REDACTED:MY_SERVICE_TOKEN] port=8080 home=/home/a key=abc"


def test_known_key_formats_are_replaced_without_a_variable():
    text = (f"export OPENAI_API_KEY={OPENAI}\nkey: {ANTHROPIC}\nAKIAIOSFODNN7EXAMPLE\n"
            "Authorization: Bearer abcdefghijklmnop1234\n"
            "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n"
            "ghp_" + "a" * 36 + "\n")
    out = Redactor().redact_text(text)
    for secret in (OPENAI, ANTHROPIC, "AKIAIOSFODNN7EXAMPLE", "abcdefghijklmnop1234", "b3BlbnNzaC1rZXktdjEAAAAA",
                   "ghp_" + "a" * 36):
        assert secret not in out
    for label in ("openai-key", "anthropic-key", "aws-access-key", "bearer", "private-key", "github-token"):
        assert f"[REDACTED:{label}]" in out
    assert "export OPENAI_API_KEY=" in out  # the surrounding text stays readable


def test_a_secret_containing_another_is_replaced_whole():
    r = Redactor({"A_TOKEN": "abcdefgh", "B_TOKEN": "abcdefgh-and-more"})
    assert r.redact_text("x abcdefgh-and-more y abcdefgh") == "x [REDACTED:B_TOKEN] y [REDACTED:A_TOKEN]"


@given(st.text(min_size=0, max_size=200))
def test_text_without_secrets_is_unchanged(text):
    r = Redactor({"API_KEY": "zz-secret-value-zz"})
    if "zz-secret-value-zz" not in text and "sk-" not in text and "AKIA" not in text and "ASIA" not in text \
            and "gh" not in text and "xox" not in text and "earer" not in text and "PRIVATE KEY" not in text:
        assert r.redact_text(text) == text


@given(st.text(alphabet="abc xyz\n", max_size=50), st.text(alphabet="abc xyz\n", max_size=50))
def test_a_planted_secret_never_survives(before, after):
    secret = "Zq9-planted-secret-Zq9"
    out = Redactor({"SERVICE_PASSWORD": secret}).redact((before + secret + after).encode())
    assert secret.encode() not in out and b"[REDACTED:SERVICE_PASSWORD]" in out
