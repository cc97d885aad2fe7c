//! A run's tools: MCP servers started over stdio with the official SDK (`rmcp`), one process per
//! toolset per run, in the run's own working directory, under resource limits, stopped when the
//! run ends. A tool is offered to the model as `toolset__tool`; each call has a timeout, and what
//! it returns is cut to a bound before the model sees it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::CallToolRequestParams;
use rmcp::service::RunningService;
use rmcp::transport::TokioChildProcess;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

/// What a tool call needs before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Policy {
    /// Runs without asking.
    Auto,
    /// Waits for its person's approval.
    Ask,
    /// Never runs; the model is told so.
    Deny,
}

impl Policy {
    /// Parses `auto`, `ask` or `deny`.
    pub fn parse(text: &str) -> Option<Policy> {
        match text {
            "auto" => Some(Policy::Auto),
            "ask" => Some(Policy::Ask),
            "deny" => Some(Policy::Deny),
            _ => None,
        }
    }
}

/// A toolset as the operator configures it.
#[derive(Debug, Clone)]
pub struct ToolsetConfig {
    /// The name runs ask for, and the prefix of its tools' names.
    pub name: String,
    /// The MCP server's command (`npx`, `uvx`, a path).
    pub command: String,
    /// Its arguments; `{workdir}` becomes the run's working directory.
    pub args: Vec<String>,
    /// The policy of its tools without an override of their own (else from each tool's
    /// annotations: `readOnlyHint` auto, `destructiveHint` ask; else the operator's default).
    pub default: Option<Policy>,
    /// Per-tool policies.
    pub overrides: BTreeMap<String, Policy>,
    /// One server for every run (a stateless toolset, which takes no `{workdir}`), started at
    /// its first use and kept, instead of one per run.
    pub shared: bool,
}

/// Why a toolset or a tool failed.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The server could not be started or did not speak MCP.
    #[error("the toolset {toolset} could not be started: {reason}")]
    Start {
        /// The toolset.
        toolset: String,
        /// Why.
        reason: String,
    },
    /// A call did not answer in time.
    #[error("the tool did not answer within {0} s")]
    Timeout(u64),
    /// The server failed the call (not the tool reporting an error, which is a result).
    #[error("the tool server failed: {0}")]
    Failed(String),
}

/// One tool of a running toolset, as the model is offered it.
#[derive(Debug, Clone)]
pub struct Tool {
    /// `toolset__tool`.
    pub offered_as: String,
    /// The tool's own name.
    pub name: String,
    /// Its policy for this run.
    pub policy: Policy,
    /// The OpenAI `tools` entry.
    pub definition: Value,
}

/// A toolset's MCP server, running for one run.
pub struct Toolset {
    service: RunningService<rmcp::RoleClient, ()>,
    tools: Vec<Tool>,
}

/// The resource limits a tool server runs under (`prlimit`, from util-linux): open files, the
/// largest file it may write, no core dumps, and CPU seconds.
const LIMITS: [&str; 4] = [
    "--nofile=1024",
    "--fsize=1073741824",
    "--core=0",
    "--cpu=3600",
];

impl Toolset {
    /// Starts the toolset's server in `workdir` and lists its tools.
    pub async fn start(
        config: &ToolsetConfig,
        workdir: &Path,
        operator_default: Policy,
        timeout: Duration,
    ) -> Result<Toolset, ToolError> {
        let failed = |reason: String| ToolError::Start {
            toolset: config.name.clone(),
            reason,
        };
        let workdir_text = workdir.display().to_string();
        let mut command = tokio::process::Command::new("prlimit");
        command
            .args(LIMITS)
            .arg("--")
            .arg(&config.command)
            .args(
                config
                    .args
                    .iter()
                    .map(|arg| arg.replace("{workdir}", &workdir_text)),
            )
            .current_dir(workdir)
            .kill_on_drop(true);
        // The server's own diagnostics may quote what it was given: not for our logs.
        let (transport, _) = TokioChildProcess::builder(command)
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|error| failed(format!("{}: {error}", config.command)))?;
        let started = tokio::time::timeout(timeout, async {
            let service = ().serve(transport).await.map_err(|error| failed(error.to_string()))?;
            let listed = service
                .list_all_tools()
                .await
                .map_err(|error| failed(error.to_string()))?;
            Ok::<_, ToolError>((service, listed))
        })
        .await
        .map_err(|_| failed(format!("no answer within {} s", timeout.as_secs())))??;
        let (service, listed) = started;
        let tools = listed
            .iter()
            .filter_map(|tool| serde_json::to_value(tool).ok())
            .filter_map(|tool| offered(config, &tool, operator_default))
            .collect();
        Ok(Toolset { service, tools })
    }

    /// Its tools.
    pub fn tools(&self) -> &[Tool] {
        &self.tools
    }

    /// Calls `tool` with `arguments`; its text (or, if it has none, its structured result), cut
    /// to `output_max` bytes, and whether the tool reported an error.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Map<String, Value>,
        timeout: Duration,
        output_max: usize,
    ) -> Result<(String, bool), ToolError> {
        let mut params = CallToolRequestParams::new(tool.to_string());
        params.arguments = Some(arguments);
        let result = tokio::time::timeout(timeout, self.service.call_tool(params))
            .await
            .map_err(|_| ToolError::Timeout(timeout.as_secs()))?
            .map_err(|error| ToolError::Failed(error.to_string()))?;
        let result = serde_json::to_value(&result).unwrap_or(Value::Null);
        let texts: Vec<&str> = result["content"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|block| block["text"].as_str())
            .collect();
        let text = if texts.is_empty() {
            match &result["structuredContent"] {
                Value::Null => String::new(),
                structured => structured.to_string(),
            }
        } else {
            texts.join("\n")
        };
        let is_error = result["isError"].as_bool().unwrap_or(false);
        Ok((bounded(text, output_max), is_error))
    }

    /// Whether its server has gone (its connection closed).
    pub fn closed(&self) -> bool {
        self.service.is_closed()
    }

    /// Stops the server.
    pub async fn stop(self) {
        let _ = self.service.cancel().await;
    }
}

/// A tool as the model is offered it, with its policy: the operator's per-tool override, else
/// the toolset's default, else the tool's annotations, else the operator's default.
fn offered(config: &ToolsetConfig, tool: &Value, operator_default: Policy) -> Option<Tool> {
    let name = tool["name"].as_str()?.to_string();
    let annotations = &tool["annotations"];
    let policy = config
        .overrides
        .get(&name)
        .copied()
        .or(config.default)
        .or_else(|| {
            if annotations["destructiveHint"] == json!(true) {
                Some(Policy::Ask)
            } else if annotations["readOnlyHint"] == json!(true) {
                Some(Policy::Auto)
            } else {
                None
            }
        })
        .unwrap_or(operator_default);
    let offered_as = format!("{}__{name}", config.name);
    let parameters = match &tool["inputSchema"] {
        Value::Object(schema) => Value::Object(schema.clone()),
        _ => json!({"type": "object", "properties": {}}),
    };
    let definition = json!({
        "type": "function",
        "function": {
            "name": offered_as,
            "description": tool["description"].as_str().unwrap_or(""),
            "parameters": parameters,
        },
    });
    Some(Tool {
        offered_as,
        name,
        policy,
        definition,
    })
}

/// `text` cut to at most `max` bytes, on a character boundary, saying so when it was cut.
pub fn bounded(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}\n[cut: {} more bytes not shown]",
        &text[..end],
        text.len() - end
    )
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn config(default: Option<Policy>, overrides: &[(&str, Policy)]) -> ToolsetConfig {
        ToolsetConfig {
            name: "files".to_string(),
            command: "true".to_string(),
            args: Vec::new(),
            default,
            overrides: overrides
                .iter()
                .map(|(name, policy)| (name.to_string(), *policy))
                .collect(),
            shared: false,
        }
    }

    fn policy(config: &ToolsetConfig, tool: Value) -> Policy {
        offered(config, &tool, Policy::Ask)
            .map(|tool| tool.policy)
            .unwrap_or(Policy::Deny)
    }

    #[test]
    fn a_tools_policy_comes_from_the_operator_first_then_its_annotations() {
        let read = json!({"name": "read_file", "annotations": {"readOnlyHint": true}});
        let write = json!({"name": "write_file", "annotations": {"destructiveHint": true}});
        let plain = json!({"name": "echo"});
        let none = config(None, &[]);
        assert_eq!(policy(&none, read.clone()), Policy::Auto);
        assert_eq!(policy(&none, write.clone()), Policy::Ask);
        assert_eq!(policy(&none, plain.clone()), Policy::Ask);
        let strict = config(Some(Policy::Deny), &[("read_file", Policy::Auto)]);
        assert_eq!(policy(&strict, read), Policy::Auto);
        assert_eq!(policy(&strict, write), Policy::Deny);
        assert_eq!(policy(&strict, plain.clone()), Policy::Deny);
        let offered = offered(&none, &plain, Policy::Auto).unwrap();
        assert_eq!(offered.offered_as, "files__echo");
        assert_eq!(offered.definition["function"]["name"], "files__echo");
        assert_eq!(
            offered.definition["function"]["parameters"]["type"],
            "object"
        );
    }

    #[test]
    fn output_is_cut_on_a_character_boundary() {
        assert_eq!(bounded("short".to_string(), 10), "short");
        let cut = bounded("ééééé".to_string(), 3);
        assert!(cut.starts_with("é\n[cut: 8 more bytes"), "{cut}");
    }
}
