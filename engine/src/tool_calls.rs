//! Tool calls: how tools are shown to a model, how a forced call is
//! constrained, and how the model's calls are read back out of its text.
//!
//! Two formats, picked by the model's chat template:
//!
//! - [`ToolFormat::Tagged`]: templates with tool support in the Hermes style
//!   (Qwen2.5, Qwen3) render the tools themselves and expect each call as
//!   `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`.
//! - [`ToolFormat::Json`]: templates without tool support (SmolLM2, Gemma 3).
//!   The tools are described in a system prompt block, and the model answers
//!   a call with one bare JSON object `{"name": ..., "arguments": {...}}`.
//!
//! [`ToolCallParser`] reads either format from streamed text: text outside
//! calls passes through as soon as it cannot be the start of a call, and each
//! complete call comes out as a [`Piece::Call`]. Parsing lives here, below every
//! interface, so IPC, HTTP and zenoh clients all get the same calls.

use serde_json::{json, Value};

use crate::chat_template::ChatMessage;
use crate::constraint::{json_compile_options, GrammarSpec};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// How a model writes tool calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>{json}</tool_call>`, tools rendered by the template.
    Tagged,
    /// A bare JSON object; tools described in a system prompt.
    Json,
}

impl ToolFormat {
    /// The format a chat template's source implies.
    pub fn for_template(source: &str) -> Self {
        if source.contains(OPEN) && source.contains("tools") {
            ToolFormat::Tagged
        } else {
            ToolFormat::Json
        }
    }
}

/// Which call, if any, generation must produce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ForcedCall {
    /// One of the tools.
    Any,
    /// This tool.
    Named(String),
}

/// The `function` objects of OpenAI-shaped tools (`{"type": "function",
/// "function": {...}}`); bare function objects are taken as they are.
fn functions(tools: &Value) -> Vec<&Value> {
    tools
        .as_array()
        .map(|a| {
            a.iter()
                .map(|t| t.get("function").unwrap_or(t))
                .filter(|f| f.get("name").and_then(Value::as_str).is_some())
                .collect()
        })
        .unwrap_or_default()
}

/// The system prompt block that describes the tools to a model whose template
/// cannot ([`ToolFormat::Json`]).
pub fn tools_prompt(tools: &Value, forced: Option<&ForcedCall>) -> String {
    let mut s = String::from(
        "You can call these tools. Each is described by a JSON schema of its arguments:\n",
    );
    for f in functions(tools) {
        s.push_str(&f.to_string());
        s.push('\n');
    }
    s.push_str(match forced {
        None => "To call a tool, answer with only a JSON object of the form {\"name\": <tool name>, \"arguments\": <arguments object>}. Otherwise answer in plain text.",
        Some(ForcedCall::Any) => "Answer with only a JSON object of the form {\"name\": <tool name>, \"arguments\": <arguments object>} that calls one of the tools.",
        Some(ForcedCall::Named(_)) => "Answer with only a JSON object of the form {\"name\": <tool name>, \"arguments\": <arguments object>} that calls the tool named below.",
    });
    if let Some(ForcedCall::Named(n)) = forced {
        s.push_str("\nTool to call: ");
        s.push_str(n);
    }
    s
}

/// Rewrites a conversation for a template without tool support: the tools
/// block joins the system message, earlier calls become the JSON the model
/// would have written, and tool results become user messages.
pub fn json_format_messages(
    messages: &[ChatMessage],
    tools: Option<&Value>,
    forced: Option<&ForcedCall>,
) -> Vec<ChatMessage> {
    let mut out: Vec<ChatMessage> = Vec::with_capacity(messages.len() + 1);
    for m in messages {
        let mut m = m.clone();
        if !m.tool_calls.is_empty() {
            let calls: Vec<String> = m
                .tool_calls
                .iter()
                .map(|c| {
                    let f = c.get("function").unwrap_or(c);
                    json!({"name": f.get("name"), "arguments": f.get("arguments")}).to_string()
                })
                .collect();
            if !m.content.is_empty() {
                m.content.push('\n');
            }
            m.content.push_str(&calls.join("\n"));
            m.tool_calls.clear();
        }
        if m.role == "tool" {
            let name = m.name.take().unwrap_or_else(|| "the tool".into());
            m = ChatMessage::new("user", format!("Result from {name}: {}", m.content));
        }
        out.push(m);
    }
    if let Some(tools) = tools.filter(|t| !functions(t).is_empty()) {
        let block = tools_prompt(tools, forced);
        match out.first_mut() {
            Some(first) if first.role == "system" => {
                first.content = format!("{}\n\n{block}", first.content);
            }
            _ => out.insert(0, ChatMessage::new("system", block)),
        }
    }
    out
}

/// The JSON schema of one call of the function `f`.
fn call_schema(f: &Value) -> Value {
    let name = f.get("name").cloned().unwrap_or(Value::Null);
    let params = f
        .get("parameters")
        .cloned()
        .unwrap_or_else(|| json!({"type": "object"}));
    json!({
        "type": "object",
        "properties": {"name": {"const": name}, "arguments": params},
        "required": ["name", "arguments"],
        "additionalProperties": false
    })
}

/// The grammar that makes generation one call of the forced tool (or of any
/// tool), its arguments following the tool's schema. `None` when the forced
/// tool is not among the tools.
pub fn call_grammar(format: ToolFormat, tools: &Value, forced: &ForcedCall) -> Option<GrammarSpec> {
    let fs = functions(tools);
    let chosen: Vec<&Value> = match forced {
        ForcedCall::Any => fs,
        ForcedCall::Named(n) => fs
            .into_iter()
            .filter(|f| f.get("name").and_then(Value::as_str) == Some(n))
            .collect(),
    };
    if chosen.is_empty() {
        return None;
    }
    let mut schema = if chosen.len() == 1 {
        call_schema(chosen[0])
    } else {
        json!({"anyOf": chosen.iter().map(|f| call_schema(f)).collect::<Vec<_>>()})
    };
    schema["x-guidance"] = json_compile_options();
    Some(match format {
        ToolFormat::Json => GrammarSpec::JsonSchema(schema),
        ToolFormat::Tagged => GrammarSpec::Lark(format!(
            "start: \"{OPEN}\\n\" call \"\\n{CLOSE}\"\ncall: %json {schema}\n"
        )),
    })
}

/// What the parser makes of the text.
#[derive(Clone, Debug, PartialEq)]
pub enum Piece {
    /// Text for the answer.
    Text(String),
    /// A complete tool call.
    Call {
        /// The tool's name.
        name: String,
        /// Its arguments (a JSON object when the model wrote one).
        arguments: Value,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// Tagged: outside a call. Json: not yet known whether the answer is a call.
    Start,
    /// Passing text through (Json: the answer is not a call).
    Text,
    /// Inside `<tool_call>` (Tagged) or a JSON answer (Json).
    Call,
}

/// Reads tool calls out of streamed text.
#[derive(Debug)]
pub struct ToolCallParser {
    format: ToolFormat,
    state: State,
    buf: String,
}

/// A `{"name": .., "arguments": ..}` object as a call (arguments given as a
/// JSON string are read as JSON; `parameters` is accepted for `arguments`).
fn as_call(v: &Value) -> Option<Piece> {
    let name = v.get("name")?.as_str()?.to_string();
    let args = v.get("arguments").or_else(|| v.get("parameters"));
    let arguments = match args {
        None => json!({}),
        Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
        Some(a) => a.clone(),
    };
    Some(Piece::Call { name, arguments })
}

/// Calls in a JSON answer: one object or a list of them; `None` if it is not
/// one (fences of a Markdown code block are tolerated).
fn parse_calls(text: &str) -> Option<Vec<Piece>> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .map(|r| r.trim_end().trim_end_matches("```").trim())
        .unwrap_or(t);
    match serde_json::from_str::<Value>(t).ok()? {
        Value::Array(items) if !items.is_empty() => items.iter().map(as_call).collect(),
        v @ Value::Object(_) => Some(vec![as_call(&v)?]),
        _ => None,
    }
}

/// The length of the longest suffix of `s` that is a proper prefix of `pat`.
fn partial_suffix(s: &str, pat: &str) -> usize {
    (1..pat.len().min(s.len() + 1))
        .rev()
        .find(|&n| s.is_char_boundary(s.len() - n) && pat.starts_with(&s[s.len() - n..]))
        .unwrap_or(0)
}

impl ToolCallParser {
    /// A parser for this format.
    pub fn new(format: ToolFormat) -> Self {
        Self {
            format,
            state: State::Start,
            buf: String::new(),
        }
    }

    /// Feeds the next text; returns what is now certain.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        let mut out = Vec::new();
        self.buf.push_str(text);
        match self.format {
            ToolFormat::Json => self.push_json(&mut out),
            ToolFormat::Tagged => self.push_tagged(&mut out),
        }
        out
    }

    fn push_json(&mut self, out: &mut Vec<Piece>) {
        if self.state == State::Start {
            let Some(c) = self.buf.trim_start().chars().next() else {
                return;
            };
            self.state = if matches!(c, '{' | '[' | '`') {
                State::Call
            } else {
                State::Text
            };
        }
        if self.state == State::Text && !self.buf.is_empty() {
            out.push(Piece::Text(std::mem::take(&mut self.buf)));
        }
    }

    fn push_tagged(&mut self, out: &mut Vec<Piece>) {
        loop {
            match self.state {
                State::Start | State::Text => {
                    if let Some(at) = self.buf.find(OPEN) {
                        if at > 0 {
                            out.push(Piece::Text(self.buf[..at].to_string()));
                        }
                        self.buf.drain(..at + OPEN.len());
                        self.state = State::Call;
                        continue;
                    }
                    // Hold back what may be the start of a tag.
                    let keep = partial_suffix(&self.buf, OPEN);
                    let cut = self.buf.len() - keep;
                    if cut > 0 {
                        out.push(Piece::Text(self.buf[..cut].to_string()));
                        self.buf.drain(..cut);
                    }
                    return;
                }
                State::Call => {
                    let Some(at) = self.buf.find(CLOSE) else {
                        return;
                    };
                    let body = self.buf[..at].to_string();
                    self.buf.drain(..at + CLOSE.len());
                    match parse_calls(&body) {
                        Some(calls) => out.extend(calls),
                        None => out.push(Piece::Text(format!("{OPEN}{body}{CLOSE}"))),
                    }
                    self.state = State::Text;
                }
            }
        }
    }

    /// Ends the text: whatever is held back comes out, as calls if it parses.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        let state = std::mem::replace(&mut self.state, State::Text);
        if rest.is_empty() {
            return Vec::new();
        }
        let calls = match (self.format, state) {
            (_, State::Call) => parse_calls(&rest),
            _ => None,
        };
        match calls {
            Some(c) => c,
            None if state == State::Call && self.format == ToolFormat::Tagged => {
                vec![Piece::Text(format!("{OPEN}{rest}"))]
            }
            None => vec![Piece::Text(rest)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(format: ToolFormat, chunks: &[&str]) -> Vec<Piece> {
        let mut p = ToolCallParser::new(format);
        let mut out: Vec<Piece> = chunks.iter().flat_map(|c| p.push(c)).collect();
        out.extend(p.finish());
        // Merge adjacent text for comparison.
        let mut merged: Vec<Piece> = Vec::new();
        for piece in out {
            match (merged.last_mut(), piece) {
                (Some(Piece::Text(a)), Piece::Text(b)) => a.push_str(&b),
                (_, p) => merged.push(p),
            }
        }
        merged
    }

    fn call(name: &str, args: Value) -> Piece {
        Piece::Call {
            name: name.into(),
            arguments: args,
        }
    }

    #[test]
    fn tagged_calls_split_across_chunks() {
        let out = run(
            ToolFormat::Tagged,
            &[
                "Sure. <tool",
                "_call>\n{\"name\": \"grip\", \"argu",
                "ments\": {\"force\": 2}}\n</tool_",
                "call> done",
            ],
        );
        assert_eq!(
            out,
            vec![
                Piece::Text("Sure. ".into()),
                call("grip", json!({"force": 2})),
                Piece::Text(" done".into())
            ]
        );
    }

    #[test]
    fn tagged_text_streams_without_waiting_and_bad_calls_stay_text() {
        let mut p = ToolCallParser::new(ToolFormat::Tagged);
        assert_eq!(p.push("a < b"), vec![Piece::Text("a < b".into())]);
        assert_eq!(p.push(" <tool"), vec![Piece::Text(" ".into())]);
        assert_eq!(p.push("box>"), vec![Piece::Text("<toolbox>".into())]);
        let out = run(ToolFormat::Tagged, &["<tool_call>not json</tool_call>"]);
        assert_eq!(
            out,
            vec![Piece::Text("<tool_call>not json</tool_call>".into())]
        );
        let out = run(
            ToolFormat::Tagged,
            &["<tool_call>{\"name\": \"f\", \"arguments\": {}}"],
        );
        assert_eq!(out, vec![call("f", json!({}))]);
    }

    #[test]
    fn json_answers_are_calls_only_when_they_parse_as_one() {
        assert_eq!(
            run(
                ToolFormat::Json,
                &[" {\"name\": \"f\",", " \"arguments\": \"{\\\"x\\\": 1}\"}"]
            ),
            vec![call("f", json!({"x": 1}))]
        );
        assert_eq!(
            run(ToolFormat::Json, &["```json\n[{\"name\": \"a\", \"arguments\": {}}, {\"name\": \"b\", \"parameters\": {}}]\n```"]),
            vec![call("a", json!({})), call("b", json!({}))]
        );
        assert_eq!(
            run(ToolFormat::Json, &["{\"x\": 1}"]),
            vec![Piece::Text("{\"x\": 1}".into())]
        );
        let mut p = ToolCallParser::new(ToolFormat::Json);
        assert_eq!(p.push("Hello"), vec![Piece::Text("Hello".into())]);
        assert_eq!(p.push(" {"), vec![Piece::Text(" {".into())]);
    }

    #[test]
    fn formats_follow_the_template() {
        let qwen = "{%- if tools %}...<tool_call>\\n{\"name\": ...}</tool_call>{% endif %}";
        assert_eq!(ToolFormat::for_template(qwen), ToolFormat::Tagged);
        assert_eq!(ToolFormat::for_template("{{ messages }}"), ToolFormat::Json);
    }

    #[test]
    fn json_format_rewrites_the_conversation() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
        let mut asst = ChatMessage::new("assistant", "");
        asst.tool_calls =
            vec![json!({"type": "function", "function": {"name": "f", "arguments": {"a": 1}}})];
        let mut tool = ChatMessage::new("tool", "42");
        tool.name = Some("f".into());
        let msgs = [ChatMessage::new("user", "go"), asst, tool];
        let out = json_format_messages(&msgs, Some(&tools), Some(&ForcedCall::Any));
        assert_eq!(out[0].role, "system");
        assert!(
            out[0].content.contains("\"name\":\"f\""),
            "{}",
            out[0].content
        );
        assert_eq!(out[2].content, r#"{"name":"f","arguments":{"a":1}}"#);
        assert_eq!(out[3], ChatMessage::new("user", "Result from f: 42"));
    }

    #[test]
    fn call_grammars() {
        let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}},
                           {"type": "function", "function": {"name": "g"}}]);
        let Some(GrammarSpec::JsonSchema(s)) =
            call_grammar(ToolFormat::Json, &tools, &ForcedCall::Named("f".into()))
        else {
            panic!("a JSON schema")
        };
        assert_eq!(s["properties"]["name"]["const"], "f");
        let Some(GrammarSpec::Lark(l)) = call_grammar(ToolFormat::Tagged, &tools, &ForcedCall::Any)
        else {
            panic!("a Lark grammar")
        };
        assert!(l.starts_with("start: \"<tool_call>\\n\" call"), "{l}");
        assert!(l.contains("anyOf"));
        assert_eq!(
            call_grammar(ToolFormat::Json, &tools, &ForcedCall::Named("h".into())),
            None
        );
    }
}
