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


def test_short_environment_values_are_left_alone_however_named():
    """A session's environment is the daemon's (sessions.py): a value shorter than 8 characters under a
    credential's name (a flag, a port) would redact ordinary text, so only longer ones are secrets."""
    r = Redactor({"TOKENIZERS_PARALLELISM": "false", "AUTH_PORT": "8443", "SEVEN_KEY": "1234567",
                  "EIGHT_KEY": "12345678"})
    assert r.redact_text("false 8443 1234567 12345678") == "false 8443 1234567 [REDACTED:EIGHT_KEY]"


KEY_BODY = ["MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo", "4lgOEePzNm0tRgeLezV6ffAt0gunVTLw7onL",
            "Rnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKf"]
KEY = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(KEY_BODY) + "\n-----END RSA PRIVATE KEY-----"


def test_part_of_a_private_key_is_redacted_too():
    """`head` or `tail` of a key file, or a key that the output cap cut in two (session.py): its body goes."""
    head, tail = KEY.split(KEY_BODY[1])
    cut = f"ran: cat id_rsa\n{head}[rloopd: 9000 bytes of output not kept]\n{tail}\ndone.\n"
    escaped = '{"text": "' + head.replace("\n", "\\n") + '"}\n'  # as in an agent's JSON stream
    encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,9F3\n\n" + head[32:]
    for text in (cut, escaped, encrypted, "look: " + tail, "    " + KEY.replace("\n", "\n    ") + "\n"):
        out = Redactor().redact_text(text)
        assert not any(line[i:i + 8] in out for line in KEY_BODY for i in range(len(line) - 7)), out
        assert "[REDACTED:private-key]" in out
    out = Redactor().redact_text(cut)
    assert out.startswith("ran: cat id_rsa\n[REDACTED:private-key][rloopd: 9000 bytes of output not kept]")
    assert out.endswith("[REDACTED:private-key]\ndone.\n")
    assert Redactor().redact_text(escaped) == '{"text": "[REDACTED:private-key]"}\n'


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
