//! Chat templates: a model's Jinja template rendered as Hugging Face renders it.
//!
//! The one decision: **the reference renderer is `transformers`'
//! `apply_chat_template`**, because that is what model authors test their
//! templates with. So the environment is set up the way transformers sets up
//! jinja2: `trim_blocks` and `lstrip_blocks` on, a `tojson` filter that is
//! Python's `json.dumps` (`", "`/`": "` separators, no HTML escaping, non-ASCII
//! kept, `indent`/`ensure_ascii`/`sort_keys`/`separators` accepted), and the
//! globals `raise_exception` and `strftime_now`. Python string and dict methods
//! (`.strip()`, `.items()`, `.get()`, ...) come from minijinja-contrib's pycompat.
//!
//! A template is compiled once ([`ChatTemplate::new`]) and rendered per request.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use minijinja::value::{Kwargs, Serde, ValueKind};
use minijinja::{Environment, ErrorKind, Value};

use crate::{Error, Result};

/// The name the template is registered under; it appears in error locations.
const NAME: &str = "chat_template";

/// One message of a conversation, as chat templates read it (`message['role']`,
/// `message['content']`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The message text.
    pub content: String,
    /// An assistant message's tool calls, in OpenAI's shape
    /// (`{"type": "function", "function": {"name", "arguments"}}`, the
    /// arguments as a JSON object); absent when empty, as templates test
    /// `message.tool_calls is defined`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A tool message: the id of the call it answers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool message: the tool's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

impl ChatMessage {
    /// A message with this role and text.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
            tool_calls: Vec::new(),
            tool_call_id: None,
            name: None,
        }
    }
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    /// Characters of the supplementary private-use planes (15 and 16) in
    /// the template's text, found once: never placeholders of
    /// [`crate::message_text`].
    private_use: Vec<char>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

fn template_err(e: minijinja::Error) -> Error {
    // The detail is the template's own message (e.g. raise_exception's text);
    // the location says where in the template it happened.
    let mut message = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        let _ = write!(message, ": {s}");
        source = s.source();
    }
    Error::Template(message)
}

impl ChatTemplate {
    /// Compiles a template; a syntax error names its line.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(template_err)?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_filter("tojson", tojson);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_template_owned(NAME, source.to_owned())
            .map_err(template_err)?;
        Ok(Self {
            env,
            private_use: source
                .chars()
                .filter(|&c| crate::message_text::in_planes(c))
                .collect(),
        })
    }

    /// The template's own characters of planes 15 and 16.
    pub fn private_use(&self) -> &[char] {
        &self.private_use
    }

    /// Renders a conversation. `bos_token`/`eos_token` are the model's token
    /// texts; `extra`, when given, is a JSON object whose keys become template
    /// variables (e.g. `tools`, `documents`, `enable_thinking`).
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        bos_token: &str,
        eos_token: &str,
        extra: Option<&serde_json::Value>,
    ) -> Result<String> {
        let mut ctx: BTreeMap<String, Value> = BTreeMap::new();
        match extra {
            None | Some(serde_json::Value::Null) => {}
            Some(serde_json::Value::Object(map)) => {
                for (key, value) in map {
                    ctx.insert(key.clone(), Value::from(Serde(value)));
                }
            }
            Some(other) => {
                return Err(Error::Template(format!(
                    "extra template variables must be a JSON object, not {other}"
                )))
            }
        }
        ctx.insert("messages".into(), Value::from(Serde(messages)));
        ctx.insert(
            "add_generation_prompt".into(),
            Value::from(add_generation_prompt),
        );
        ctx.insert("bos_token".into(), Value::from(bos_token));
        ctx.insert("eos_token".into(), Value::from(eos_token));
        let template = self.env.get_template(NAME).map_err(template_err)?;
        template.render(Value::from(ctx)).map_err(template_err)
    }
}

/// `raise_exception(message)`: templates reject bad conversations with it.
fn raise_exception(message: String) -> std::result::Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// `strftime_now(format)`: the current time, UTC (robots rarely carry a time
/// zone database; transformers uses local time).
fn strftime_now(format: String) -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(&format, secs)
}

/// The `strftime` conversions chat templates use, for a UTC Unix time.
/// Unknown conversions are copied through.
fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (hour, minute, second) = (secs / 3600, secs / 60 % 60, secs % 60);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    const CUMULATIVE: [i64; 12] = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = CUMULATIVE[(month - 1) as usize] + day + i64::from(leap && month > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month_name = MONTHS[(month - 1) as usize];
    let hour12 = if hour % 12 == 0 { 12 } else { hour % 12 };

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let _ = match chars.next() {
            Some('Y') => write!(out, "{year}"),
            Some('y') => write!(out, "{:02}", year.rem_euclid(100)),
            Some('m') => write!(out, "{month:02}"),
            Some('d') => write!(out, "{day:02}"),
            Some('e') => write!(out, "{day:2}"),
            Some('j') => write!(out, "{yday:03}"),
            Some('B') => write!(out, "{month_name}"),
            Some('b') | Some('h') => write!(out, "{}", &month_name[..3]),
            Some('A') => write!(out, "{}", DAYS[weekday]),
            Some('a') => write!(out, "{}", &DAYS[weekday][..3]),
            Some('H') => write!(out, "{hour:02}"),
            Some('I') => write!(out, "{hour12:02}"),
            Some('M') => write!(out, "{minute:02}"),
            Some('S') => write!(out, "{second:02}"),
            Some('p') => write!(out, "{}", if hour < 12 { "AM" } else { "PM" }),
            Some('F') => write!(out, "{year}-{month:02}-{day:02}"),
            Some('T') => write!(out, "{hour:02}:{minute:02}:{second:02}"),
            Some('Z') => write!(out, "UTC"),
            Some('z') => write!(out, "+0000"),
            Some('%') => write!(out, "%"),
            Some(other) => write!(out, "%{other}"),
            None => write!(out, "%"),
        };
    }
    out
}

/// How `tojson` lays out JSON, as Python's `json.dumps` arguments say.
struct JsonStyle {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    sort_keys: bool,
}

/// transformers' `tojson`: `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`. A positional argument is
/// `ensure_ascii` as there, or the indent when it is a number.
fn tojson(
    value: &Value,
    positional: Option<Value>,
    kwargs: Kwargs,
) -> std::result::Result<Value, minijinja::Error> {
    let bad = |what: &str| minijinja::Error::new(ErrorKind::InvalidOperation, what.to_owned());
    let mut indent: Option<Value> = kwargs.get("indent")?;
    let mut ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
    if let Some(p) = positional {
        match p.kind() {
            ValueKind::Bool => ensure_ascii = p.is_true(),
            _ => indent = Some(p),
        }
    }
    let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
    let separators: Option<Value> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let indent = match indent {
        None => None,
        Some(v) if v.is_none() || v.is_undefined() => None,
        Some(v) => match v.as_str() {
            Some(s) => Some(s.to_owned()),
            None => {
                let n = i64::try_from(v).map_err(|_| bad("tojson: indent must be an integer"))?;
                Some(" ".repeat(n.max(0) as usize))
            }
        },
    };
    let (item_sep, key_sep) = match separators {
        Some(v) if !v.is_none() && !v.is_undefined() => {
            let parts: Vec<Value> = v.try_iter()?.collect();
            match parts.as_slice() {
                [a, b] => (
                    a.as_str()
                        .ok_or_else(|| bad("tojson: separators must be strings"))?
                        .to_owned(),
                    b.as_str()
                        .ok_or_else(|| bad("tojson: separators must be strings"))?
                        .to_owned(),
                ),
                _ => return Err(bad("tojson: separators must be a pair")),
            }
        }
        _ if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        _ => (", ".to_owned(), ": ".to_owned()),
    };
    let style = JsonStyle {
        indent,
        item_sep,
        key_sep,
        ensure_ascii,
        sort_keys,
    };
    let mut out = String::new();
    write_json(&mut out, value, &style, 0)?;
    // Safe: the JSON must reach the prompt unescaped even with autoescaping.
    Ok(Value::from_safe_string(out))
}

fn write_json(
    out: &mut String,
    value: &Value,
    style: &JsonStyle,
    depth: usize,
) -> std::result::Result<(), minijinja::Error> {
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if value.is_true() { "true" } else { "false" }),
        ValueKind::Number if value.is_integer() => {
            let _ = write!(out, "{value}");
        }
        ValueKind::Number => out.push_str(&python_float(f64::try_from(value.clone())?)),
        ValueKind::String => {
            write_json_str(out, value.as_str().unwrap_or_default(), style.ensure_ascii)
        }
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = value.try_iter()?.collect();
            write_container(out, style, depth, '[', ']', &items, |out, item| {
                write_json(out, item, style, depth + 1)
            })?;
        }
        ValueKind::Map => {
            let mut entries = Vec::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = match key.as_str() {
                    Some(s) => s.to_owned(),
                    None if key.is_none() => "null".to_owned(),
                    None if key.kind() == ValueKind::Bool => key.is_true().to_string(),
                    None => key.to_string(),
                };
                entries.push((key, item));
            }
            if style.sort_keys {
                entries.sort_by(|a, b| a.0.cmp(&b.0));
            }
            write_container(out, style, depth, '{', '}', &entries, |out, (key, item)| {
                write_json_str(out, key, style.ensure_ascii);
                out.push_str(&style.key_sep);
                write_json(out, item, style, depth + 1)
            })?;
        }
        kind => {
            return Err(minijinja::Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson: cannot serialize a value of type {kind}"),
            ))
        }
    }
    Ok(())
}

/// Writes `[...]`/`{...}` with Python's layout: inline, or one item per line
/// when indenting; empty containers stay `[]`/`{}`.
fn write_container<T>(
    out: &mut String,
    style: &JsonStyle,
    depth: usize,
    open: char,
    close: char,
    items: &[T],
    mut write_item: impl FnMut(&mut String, &T) -> std::result::Result<(), minijinja::Error>,
) -> std::result::Result<(), minijinja::Error> {
    out.push(open);
    if items.is_empty() {
        out.push(close);
        return Ok(());
    }
    let newline = |out: &mut String, level: usize| {
        if let Some(indent) = &style.indent {
            out.push('\n');
            for _ in 0..level {
                out.push_str(indent);
            }
        }
    };
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(&style.item_sep);
        }
        newline(out, depth + 1);
        write_item(out, item)?;
    }
    newline(out, depth);
    out.push(close);
    Ok(())
}

/// A JSON string as Python's `json.dumps` escapes it.
fn write_json_str(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 || (ensure_ascii && !(' '..='~').contains(&c)) => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A float as Python's `repr`: `1.0`, `0.1`, `1e-05`, `1e+16`, `Infinity`.
fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".into();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let abs = f.abs();
    if abs != 0.0 && !(1e-4..1e16).contains(&abs) {
        // Rust's `{:e}` is shortest round-trip like Python's repr; only the
        // exponent is spelled differently (`e-5` → `e-05`, `e16` → `e+16`).
        let s = format!("{f:e}");
        let (mantissa, exp) = s.split_once('e').unwrap_or((&s, "0"));
        let exp: i32 = exp.parse().unwrap_or(0);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.abs());
    }
    let s = format!("{f}");
    if s.contains('.') {
        s
    } else {
        format!("{s}.0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> Vec<ChatMessage> {
        vec![
            ChatMessage::new("system", "You are a robot."),
            ChatMessage::new("user", "Hi"),
            ChatMessage::new("assistant", "Hello."),
            ChatMessage::new("user", "Stop."),
        ]
    }

    const CHATML: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_with_and_without_generation_prompt() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let body =
            "<|im_start|>system\nYou are a robot.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n\
                    <|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nStop.<|im_end|>\n";
        let off = t.render(&conversation(), false, "", "", None).unwrap();
        assert_eq!(off, body);
        let on = t.render(&conversation(), true, "", "", None).unwrap();
        assert_eq!(on, format!("{body}<|im_start|>assistant\n"));
    }

    #[test]
    fn raise_exception_message_surfaces() {
        let t = ChatTemplate::new(
            "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}ok",
        )
        .unwrap();
        let err = t.render(&conversation(), true, "", "", None).unwrap_err();
        assert!(matches!(err, Error::Template(_)));
        assert!(
            err.to_string().contains("System role not supported"),
            "{err}"
        );
        let ok = t.render(&conversation()[1..], true, "", "", None).unwrap();
        assert_eq!(ok, "ok");
    }

    #[test]
    fn syntax_errors_are_template_errors() {
        let err = ChatTemplate::new("{% for m in messages %}").unwrap_err();
        assert!(matches!(err, Error::Template(_)), "{err}");
    }

    #[test]
    fn trim_and_lstrip_blocks_as_huggingface() {
        // With trim_blocks the newline after a block tag goes; with lstrip_blocks
        // the indentation before it does.
        let t = ChatTemplate::new("{% for m in messages %}\n    {% if true %}\n[{{ m.role }}]\n    {% endif %}\n{% endfor %}\n").unwrap();
        let out = t.render(&conversation()[..2], false, "", "", None).unwrap();
        assert_eq!(out, "[system]\n[user]\n");
    }

    #[test]
    fn python_methods_bos_eos_and_extra_variables() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{{ messages[0].content.strip().upper() }}|{{ tools | length }}|{{ enable_thinking }}{{ eos_token }}",
        )
        .unwrap();
        let extra = serde_json::json!({"tools": [1, 2], "enable_thinking": false});
        let msgs = [ChatMessage::new("user", "  hi  ")];
        let out = t.render(&msgs, false, "<s>", "</s>", Some(&extra)).unwrap();
        // Booleans print the Python way, as in jinja2.
        assert_eq!(out, "<s>HI|2|False</s>");
        assert!(t
            .render(&msgs, false, "", "", Some(&serde_json::json!([1])))
            .is_err());
    }

    #[test]
    fn tojson_is_python_json_dumps() {
        let t = ChatTemplate::new("{{ x | tojson }}\n{{ x | tojson(indent=2) }}\n{{ x | tojson(ensure_ascii=true) }}\n{{ x | tojson(separators=[',', ':'], sort_keys=true) }}").unwrap();
        let extra =
            serde_json::json!({"x": {"b": [1, 2.5, null, true], "a": "é<\"\n", "e": {}, "l": []}});
        let out = t.render(&[], false, "", "", Some(&extra)).unwrap();
        let lines: Vec<&str> = out.split('\n').collect();
        // Keys keep their order, as Python's dicts do.
        assert_eq!(
            lines[0],
            r#"{"b": [1, 2.5, null, true], "a": "é<\"\n", "e": {}, "l": []}"#
        );
        assert_eq!(
            lines[1..12].join("\n"),
            "{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": \"é<\\\"\\n\",\n  \"e\": {},\n  \"l\": []\n}"
        );
        assert_eq!(
            lines[12],
            r#"{"b": [1, 2.5, null, true], "a": "\u00e9<\"\n", "e": {}, "l": []}"#
        );
        assert_eq!(
            lines[13],
            r#"{"a":"é<\"\n","b":[1,2.5,null,true],"e":{},"l":[]}"#
        );
    }

    #[test]
    fn floats_print_like_python_repr() {
        for (f, py) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (1e-5, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e16, "1e+16"),
            (123456789.0, "123456789.0"),
            (0.0001, "0.0001"),
        ] {
            assert_eq!(python_float(f), py);
        }
    }

    #[test]
    fn strftime_formats_a_known_date() {
        // 2024-02-29 13:05:09 UTC, a Thursday.
        let t = 1_709_211_909;
        assert_eq!(strftime("%d %b %Y", t), "29 Feb 2024");
        assert_eq!(
            strftime("%A %B %e %j %H:%M:%S %p %I %%", t),
            "Thursday February 29 060 13:05:09 PM 01 %"
        );
        assert_eq!(strftime("%F %T %y %q", 0), "1970-01-01 00:00:00 70 %q");
        let t = ChatTemplate::new("{{ strftime_now('%Y') }}").unwrap();
        let year: i32 = t.render(&[], false, "", "", None).unwrap().parse().unwrap();
        assert!(year >= 2024);
    }
}
