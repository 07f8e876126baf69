"""The text policy of edits: free text an edit brings into a workflow must not carry an attack.

The free text of an edit (a new instruction, a prompt rewrite, a validation key) is written by an LLM
that read production traces, so it is as untrusted as the traces: an injected "visit
http://evil.example/login and enter your password" can come out of the prompt editor inside an
otherwise helpful rewrite, verify well and be signed. The grammar cannot see that; this policy reads
the text and refuses what an instruction to a workflow step never needs: URLs and host names, IP
addresses, e-mail addresses and handles, links and markup, code and shell commands, encoded blobs,
instructions to visit, contact or send anything, requests for credentials, prompt-injection phrases,
and invisible characters.

It reads the text the way a model would: NFKC-normalised (fullwidth letters are letters), folded to
ASCII (`anyascii`: a Cyrillic "a" in "paypal" is an "a"), with the usual obfuscations undone
(`evil[.]example`, `evil (dot) example`, `hxxp`, `user [at] host`, s p a c e d letters), and with a
few words of the common non-English languages. Only what the edit introduces counts: a violation
whose text the current prompt already holds (a prompt that mentions an e-mail or a code block by
its owner's choice) is not the edit's doing. The rules over-refuse on purpose: a refused candidate
costs a verification round; an admitted one can reach every user of the workflow.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from anyascii import anyascii

from cegraph.daemon.refine.operators import Edit
from cegraph.schemas.workflow import WorkflowSpec

EVIDENCE = 80  # characters of the offending text quoted in a reason


@dataclass(frozen=True, slots=True)
class Violation:
    rule: str  # one of RULES' names: a bounded label for metrics
    reason: str  # what the text does, with the offending part quoted

    def __str__(self) -> str:
        return self.reason


def _either(*alternatives: str) -> str:
    return r"\b(?:" + "|".join(alternatives) + r")\b"


def _an_address(candidate: str) -> bool:
    """An IPv4/IPv6 address, or a dotted quad or hex number that a resolver reads as one."""
    try:
        ipaddress.ip_address(candidate.split("%")[0])
    except ValueError:
        return candidate.startswith("0x") or candidate.count(".") == 3
    return True


@dataclass(frozen=True)
class _Rule:
    name: str
    what: str
    pattern: str
    view: Literal["ascii", "native"] = "ascii"  # folded and deobfuscated, or NFKC for non-Latin scripts
    accept: Callable[[str], bool] = lambda evidence: True

    @cached_property
    def compiled(self) -> re.Pattern[str]:
        return re.compile(self.pattern, re.IGNORECASE | re.DOTALL)


CONTACT = "an instruction to visit, contact or send"
CREDENTIALS = "a request for credentials or secrets"
_RULE_LIST = (
    _Rule("url", "a URL", r"\b[a-z][a-z0-9+.-]{1,15}\s*:\s*/\s*/\S*"),
    _Rule("url", "a URL", r"\b(?:mailto|tel|sms|callto|javascript|vbscript|data|magnet|file):[^\s]+"),
    _Rule("url", "a URL", r"\bwww\d{0,3}\.\S+"),
    _Rule(
        "url",
        "a host name",
        r"\b(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+(?:[a-z]{2,63}|xn--[a-z0-9-]{1,59})(?![a-z])(?:[:/]\S*)?",
    ),
    _Rule("email", "an e-mail address", r"[a-z0-9._%+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)*"),
    _Rule("email", "a handle", r"(?<![\w@])@[a-z_][a-z0-9_.]{2,}"),
    _Rule("link", "a link or markup", r"!?\[[^\]\n]{0,200}\]\s*\([^)\n]{0,300}\)"),
    _Rule(
        "link",
        "a link or markup",
        r"<\s*/?\s*(?:a|script|iframe|img|form|input|link|meta|style|object|embed|svg|base|body|html|frame)\b"
        r"|\b(?:href|src|action|on[a-z]+)\s*=",
    ),
    _Rule("code", "code", r"`{3,}|~{3,}|\{\{|\}\}|\$\{|\$\(|<\?|\?>|=>|__[a-z]+__"),
    _Rule(
        "code",
        "code",
        r"\bimport\s+[a-z_][\w.]*|\bfrom\s+[a-z_][\w.]*\s+import\b|\bdef\s+\w+\s*\(|\bclass\s+\w+\s*[:(]"
        r"|\blambda\b[^:\n]{0,40}:|\bfunction\s*\w*\s*\(|\b(?:var|const)\s+\w+\s*=",
    ),
    _Rule(
        "code",
        "code",
        r"\b(?:eval|exec|execfile|compile|system|popen|spawn\w*|fork|getattr|setattr|globals|locals"
        r"|require|fetch|open|urlopen|unlink|rmtree)\s*\(|\b[a-z_]\w*(?:\.[a-z_]\w*)+\s*\(",
    ),
    _Rule(
        "code",
        "code",
        r"\b(?:os|sys|subprocess|socket|shutil|requests|urllib|httpx|pickle|ctypes|builtins|importlib)\.\w+"
        r"|\b(?:select\s+.{1,80}\s+from|drop\s+table|insert\s+into|union\s+select|delete\s+from)\b",
    ),
    _Rule(
        "shell",
        "a shell command",
        r"\b(?:curl|wget|netcat|ncat|telnet|powershell|pwsh|certutil|bitsadmin|mkfifo|sudo|chmod|chown"
        r"|crontab|nslookup|scp|rsync|ssh)\b|\b(?:nc|sh|bash|zsh|rm|python3?|perl|ruby|php|node|cmd)"
        r"\s+-{1,2}[a-z]|\|\s*(?:ba|z|k|c|da)?sh\b|&&|\|\||(?<!\w)(?:/bin|/usr/bin|/etc|/dev|/tmp|/proc)/\S*"
        r"|~/\.\w+|%[a-z_]{2,}%|\$[a-z_]{2,}\b|`[^`\n]{1,200}`",
    ),
    _Rule(
        "encoded",
        "an encoded blob",
        r"(?<![a-z0-9+/_-])[a-z0-9+/_-]{24,}={0,2}|(?:%[0-9a-f]{2}){3,}"
        r"|(?:\\x[0-9a-f]{2}){2,}|(?:\\u[0-9a-f]{4}){2,}|(?:&#x?[0-9a-f]+;){2,}|\S{60,}",
    ),
    _Rule(
        "address",
        "an IP address",
        r"\b\d{1,3}(?:\.\d{1,3}){3}\b|(?<![\w:])[0-9a-f]{0,4}(?::[0-9a-f]{0,4}){2,7}(?:%\w+)?(?![\w:])"
        r"|\b0x[0-9a-f]{8}\b",
        accept=_an_address,
    ),
    _Rule("address", "a phone number", r"\+\d[\d ().-]{7,}\d"),
    _Rule(
        "contact",
        CONTACT,
        _either(
            r"visit\w*", r"navigat\w*", r"brows\w*", r"click\w*", r"tap (?:here|on|the)", r"download\w*",
            r"install\w*", r"log ?(?:in|on)(?: to)?", r"login", r"sign ?(?:in|up)",
            r"register (?:at|on|with)",
            r"subscrib\w*", r"contact\w*", r"reach(?:ing)? out", r"whats ?app", r"telegram", r"forward\w*",
            r"e-?mail (?:us|me|them|him|her|it|to|the)", r"dm (?:us|me)", r"text (?:us|me)",
            r"exfiltrat\w*", r"leak\w*", r"wire (?:the|money|funds)", r"transfer (?:the )?(?:money|funds)",
            r"(?:phone|dial|ring) (?:us|me|them|the|this|\+|\d)",
            r"call (?:us|me|them|this number|the number|\+|\d|support)",
            r"(?:go|head|come) (?:over )?to (?:the |our |this |my )?"
            r"(?:site|website|page|link|url|portal|address|domain)",
            r"(?:open|follow|check(?: out)?) (?:the |this |our |my )?"
            r"(?:link|url|site|website|page|portal|browser)",
            r"(?:send|submit|upload|post|share|mail|report|reply|respond|write|give|pass|hand)\b[^.\n]{0,40}?"
            r"\b(?:to|at|via|through) (?:us|me|them|him|her|our|my|this|the (?:admin|support|team|server"
            r"|address|endpoint|number|channel|account|email|e-mail)|an? (?:email|e-mail|address|server"
            r"|endpoint|number)|@|\S+\.\S+)",
        ),
    ),
    _Rule(
        "credentials",
        CREDENTIALS,
        _either(
            r"passwords?", r"passcodes?", r"passphrases?", r"credentials?", r"login details",
            r"(?:api|access|secret|private|auth|bearer|session|security|signing)[ _-]?(?:keys?|tokens?)",
            r"apikey", r"one[ -]time (?:code|password)", r"otp", r"2fa", r"mfa", r"verification code",
            r"pin(?: code| number)?", r"cvv", r"cvc", r"card number", r"credit card", r"bank account",
            r"iban", r"ssn", r"social security", r"seed phrase", r"recovery phrase", r"mnemonic", r"wallet",
            r"(?:enter|type|share|reveal|send|give (?:us|me)) your (?:\w+ )?(?:details|information|info"
            r"|data|account|login|username|user name|number|address)",
        ),
    ),
    _Rule(
        "steering",
        "an instruction aimed at the model",
        _either(
            r"(?:ignore|disregard|forget|override|bypass) (?:all |any |the |your |every |these )?"
            r"(?:previous |prior |above |earlier |preceding |original |system )?"
            r"(?:instructions?|rules|prompts?|messages|guidelines)",
            r"new instructions?", r"system prompt", r"developer mode", r"jailbreak\w*", r"do anything now",
            r"you must now", r"from now on",
        ),
    ),
    # the same in a few other languages: Latin scripts as folded to ASCII, others as written
    _Rule(
        "contact",
        CONTACT,
        _either(
            r"besuchen?", r"gehen sie zu", r"gehe zu", r"klicken?", r"klicke", r"anmelden", r"melde dich an",
            r"herunterladen", r"installieren?", r"senden?", r"schicken?", r"schicke", r"kontaktieren?",
            r"rufen sie an", r"rufe an", r"anrufen", r"visitez", r"rendez-vous sur", r"allez sur", r"cliquez",
            r"connectez-vous", r"telechargez", r"installez", r"envoyez", r"envoie", r"envoyer", r"contactez",
            r"contacter", r"appelez", r"ecrivez a", r"visita", r"visite", r"visitar", r"visitate", r"vaya a",
            r"haz clic", r"haga clic", r"inicia sesion", r"inicie sesion", r"descarga", r"descargue",
            r"instala", r"envia", r"envie", r"enviar", r"contacta", r"contacte", r"llame", r"escribe a",
            r"acesse", r"acessar", r"faca login", r"baixe", r"contate", r"vai su", r"clicca", r"accedi",
            r"scarica", r"invia", r"inviare", r"contatta", r"chiama", r"scrivi a", r"bezoek", r"ga naar",
            r"klik", r"stuur", r"verstuur", r"neem contact op", r"odwiedz", r"kliknij", r"zaloguj", r"wyslij",
            r"skontaktuj", r"zadzwon", r"ziyaret edin", r"tiklayin", r"giris yapin", r"gonderin",
            r"iletisime gecin", r"arayin",
        ),
    ),
    _Rule(
        "credentials",
        CREDENTIALS,
        _either(
            r"passwort", r"kennwort", r"zugangsdaten", r"mot de passe", r"identifiants", r"code secret",
            r"contrasena", r"credenciales", r"senha", r"credenciais", r"credenziali", r"wachtwoord", r"haslo",
            r"sifre",
        ),
    ),
    _Rule(
        "contact",
        CONTACT,
        "посетите|посети|перейдите|перейди|зайдите|нажмите|войдите|скачайте|установите|отправьте|отправь"
        "|пришлите|свяжитесь|позвоните|напишите|відвідайте|перейдіть|надішліть|зателефонуйте"
        "|访问|登录|登陆|点击|下载|打开链接|发送|发给|联系|致电|アクセス|ログイン|クリック|ダウンロード|送信"
        "|送って|連絡|電話して|방문|로그인|클릭|다운로드|보내|연락|전화|قم بزيارة|زيارة|أرسل|اتصل|ارسل",
        view="native",
    ),
    _Rule(
        "credentials",
        CREDENTIALS,
        "пароль|логин|учётные данные|учетные данные|密码|密碼|账号|帐号|验证码|パスワード|暗証番号|비밀번호"
        "|암호|كلمة المرور|كلمة السر",
        view="native",
    ),
)  # fmt: skip
RULES = tuple(sorted({rule.name for rule in _RULE_LIST} | {"hidden"}))

# obfuscations undone before matching: (pattern, replacement)
_UNDO = (
    (re.compile(r"\s*[\[({<]\s*(?:dot|\.)\s*[\])}>]\s*", re.I), "."),
    (re.compile(r"\s+dot\s+(?=[a-z]{2,6}\b)", re.I), "."),
    (re.compile(r"\s*[\[({<]\s*(?:at|@)\s*[\])}>]\s*", re.I), "@"),
    (re.compile(r"(?<=\w)\s+at\s+(?=[\w-]+(?:\.[\w-]+)*\.[a-z]{2,})", re.I), "@"),
    (re.compile(r"\s*[\[({<]\s*:\s*[\])}>]\s*"), ":"),
    (re.compile(r"\bh[xt*]{2}p(s?)\b", re.I), r"http\1"),
    (re.compile(r"\s*:\s*/\s*/\s*"), "://"),
)
_SPACED = re.compile(r"\b(?:\w(?:\s*[.\-_:/]\s*|\s+)){2,}\w\b")


def _hidden(text: str) -> set[str]:
    """Invisible or control characters (zero-width, bidirectional overrides, private use, unassigned)."""
    return {
        f"U+{ord(char):04X} {unicodedata.name(char, 'unnamed')}"
        for char in text
        if char not in "\n\t\r" and unicodedata.category(char) in ("Cc", "Cf", "Co", "Cs", "Cn")
    }


def _views(text: str) -> dict[str, str]:
    """The text as the rules read it: `native` (NFKC, no invisible characters) and `ascii` (that, folded
    to ASCII, with the obfuscations undone, and again with spaced-out letters joined)."""
    native = "".join(c for c in unicodedata.normalize("NFKC", text) if not _hidden(c))
    folded = anyascii(native)
    for pattern, replacement in _UNDO:
        folded = pattern.sub(replacement, folded)
    joined = _SPACED.sub(lambda m: re.sub(r"\s+", "", m.group(0)), folded)
    return {"native": native, "ascii": folded if joined == folded else f"{folded}\n{joined}"}


def violations(text: str, *, before: str = "") -> list[Violation]:
    """Every rule the text breaks (once each) with something `before`, the text it replaces, did not
    already hold."""
    hidden = sorted(_hidden(text) - _hidden(before))
    found = [Violation("hidden", f"invisible characters ({', '.join(hidden[:3])})")] if hidden else []
    views, old = _views(text), {view: text.lower() for view, text in _views(before).items()}
    for rule in _RULE_LIST:
        if any(violation.rule == rule.name for violation in found):
            continue
        for match in rule.compiled.finditer(views[rule.view]):
            evidence = match.group(0).strip()
            if evidence and evidence.lower() not in old[rule.view] and rule.accept(evidence):
                found.append(Violation(rule.name, f"{rule.what}: {evidence[:EVIDENCE]!r}"))
                break
    return found


def check(text: str, *, before: str = "") -> Violation | None:
    """The first violation of the text (see `violations`), or None when it may go into a workflow."""
    found = violations(text, before=before)
    return found[0] if found else None


def free_text(edit: Edit) -> list[tuple[str, str]]:
    """The edit's free text as (field, text): words of its proposer's choosing that it writes into the
    workflow and that a model then reads. (A retriever is a name the runtime must have registered.)"""
    texts = [("instruction", edit.instruction), *(("required key", key) for key in edit.required_keys)]
    return [(field, text) for field, text in texts if text]


def screen_edit(spec: WorkflowSpec, edit: Edit) -> Violation | None:
    """Why the edit's free text may not go into `spec`, or None. A prompt rewrite is judged by what it
    adds to the node's current prompt."""
    node = spec.nodes.get(edit.node)
    current = (getattr(node, "prompt", None) or "") if edit.operator == "edit_prompt" else ""
    for field, text in free_text(edit):
        found = check(text, before=current if field == "instruction" else "")
        if found is not None:
            return Violation(found.rule, f"text policy ({found.rule}): the {field} introduces {found.reason}")
    return None
