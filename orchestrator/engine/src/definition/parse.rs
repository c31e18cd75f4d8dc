//! Reading definition files: YAML to validated [`Definitions`], reporting every error.
//!
//! Each file is parsed to a `marked_yaml` node tree first, so every value keeps its line and
//! column. Then each saga and each step is deserialised on its own (into the file types of
//! `saga_schemas::definition`), so one bad step hides nothing else, and the semantic rules run
//! over everything that could be read. Unknown and missing keys are found by comparing each
//! mapping with its JSON Schema, so all of them are reported, not only serde's first.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use marked_yaml::types::{MarkedMappingNode, MarkedScalarNode};
use marked_yaml::{FromNodeError, LoadError, LoaderOptions, Marker, Node};
use saga_schemas::definition::{
    DefinitionFile, MappingKeys, ParallelSpec, RetrySpec, SagaSpec, StepKindSpec, StepSpec,
};
use serde_json::Value;

use super::{
    DEFAULT_COMPENSATION_RETRY, DEFAULT_EXPIRY, DEFAULT_RETRY, DEFAULT_STEP_TIMEOUT, Definitions,
    RetryPolicy, SagaDefinition, StepDefinition, StepKind,
};

/// One problem in a definition file, with where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionError {
    /// The file name, as given to the parser.
    pub file: String,
    /// The saga the problem is in, when known.
    pub saga: Option<String>,
    /// The step the problem is in, when known.
    pub step: Option<String>,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// What is wrong: names the rule that was broken.
    pub message: String,
}

impl fmt::Display for DefinitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
        }
        f.write_str(": ")?;
        match (&self.saga, &self.step) {
            (Some(saga), Some(step)) => write!(f, "saga `{saga}`, step `{step}`: ")?,
            (Some(saga), None) => write!(f, "saga `{saga}`: ")?,
            (None, Some(step)) => write!(f, "step `{step}`: ")?,
            (None, None) => {}
        }
        f.write_str(&self.message)
    }
}

/// Every problem found in a set of definition files, in file and line order.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct DefinitionErrors(pub Vec<DefinitionError>);

impl fmt::Display for DefinitionErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::ops::Deref for DefinitionErrors {
    type Target = [DefinitionError];

    fn deref(&self) -> &[DefinitionError] {
        &self.0
    }
}

impl IntoIterator for DefinitionErrors {
    type Item = DefinitionError;
    type IntoIter = std::vec::IntoIter<DefinitionError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

impl<'a> IntoIterator for &'a DefinitionErrors {
    type Item = &'a DefinitionError;
    type IntoIter = std::slice::Iter<'a, DefinitionError>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl Definitions {
    /// Parses and validates one definition file. `source` is the file name used in messages.
    pub fn parse(source: &str, yaml: &str) -> Result<Definitions, DefinitionErrors> {
        parse_all(&[(source, yaml)])
    }

    /// Parses several files as one set: saga names must be unique across all of them. The
    /// pairs are (file name, file content).
    pub fn parse_files(files: &[(String, String)]) -> Result<Definitions, DefinitionErrors> {
        let files: Vec<(&str, &str)> = files
            .iter()
            .map(|(name, text)| (name.as_str(), text.as_str()))
            .collect();
        parse_all(&files)
    }
}

fn parse_all(files: &[(&str, &str)]) -> Result<Definitions, DefinitionErrors> {
    let mut errors = Vec::new();
    let mut sagas: Vec<Parsed> = Vec::new();
    for (index, (file, text)) in files.iter().enumerate() {
        let mut cx = Cx {
            file,
            file_index: index,
            errors: &mut errors,
        };
        cx.file(text, &mut sagas);
    }

    // Saga names are unique across every file of the set.
    let mut first: HashMap<&str, &Parsed> = HashMap::new();
    for saga in &sagas {
        let Some(def) = &saga.def else { continue };
        if def.name.is_empty() {
            continue;
        }
        match first.get(def.name.as_str()) {
            Some(earlier) => {
                let mut cx = Cx {
                    file: files[saga.file_index].0,
                    file_index: saga.file_index,
                    errors: &mut errors,
                };
                let earlier_at = format!(
                    "{}{}",
                    files[earlier.file_index].0,
                    earlier
                        .name_at
                        .map(|m| format!(":{}:{}", m.line(), m.column()))
                        .unwrap_or_default()
                );
                cx.error(
                    At::saga(&def.name),
                    saga.name_at,
                    format!(
                        "duplicate saga name: `{}` is also defined at {earlier_at}",
                        def.name
                    ),
                );
            }
            None => {
                first.insert(&def.name, saga);
            }
        }
    }

    if errors.is_empty() {
        Ok(Definitions {
            sagas: sagas.into_iter().filter_map(|s| s.def).collect(),
        })
    } else {
        // Stable: errors without a position stay before those with one, in discovery order.
        errors.sort_by_key(|e| (e.file_index, e.error.line, e.error.column));
        Err(DefinitionErrors(
            errors.into_iter().map(|e| e.error).collect(),
        ))
    }
}

/// A saga as far as it could be read, and where its name is.
struct Parsed {
    file_index: usize,
    name_at: Option<Marker>,
    def: Option<SagaDefinition>,
}

struct Located {
    file_index: usize,
    error: DefinitionError,
}

/// Which saga and step an error belongs to.
#[derive(Clone, Copy, Default)]
struct At<'a> {
    saga: Option<&'a str>,
    step: Option<&'a str>,
}

impl<'a> At<'a> {
    fn saga(name: &'a str) -> Self {
        At {
            saga: non_empty(name),
            step: None,
        }
    }

    fn step(self, name: &'a str) -> Self {
        At {
            saga: self.saga,
            step: non_empty(name),
        }
    }
}

fn non_empty(name: &str) -> Option<&str> {
    (!name.is_empty()).then_some(name)
}

/// The error sink for one file.
struct Cx<'a> {
    file: &'a str,
    file_index: usize,
    errors: &'a mut Vec<Located>,
}

impl Cx<'_> {
    fn error(&mut self, at: At<'_>, marker: Option<Marker>, message: impl Into<String>) {
        self.errors.push(Located {
            file_index: self.file_index,
            error: DefinitionError {
                file: self.file.to_owned(),
                saga: at.saga.map(str::to_owned),
                step: at.step.map(str::to_owned),
                line: marker.map(|m| m.line()),
                column: marker.map(|m| m.column()),
                message: message.into(),
            },
        });
    }

    fn file(&mut self, text: &str, sagas: &mut Vec<Parsed>) {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        if let Some(line) = second_document(text) {
            // The loader would silently read only the first one.
            self.error(
                At::default(),
                Some(Marker::new(0, 0, line, 1)),
                "YAML syntax error: a definition file holds one YAML document, and this `---` \
                 starts a second one; put further sagas in the same `sagas` list or in another \
                 file",
            );
            return;
        }
        let options = LoaderOptions::default()
            .error_on_duplicate_keys(true)
            .prevent_coercion(true);
        let root = match marked_yaml::parse_yaml_with_options(0, text, options) {
            Ok(root) => root,
            Err(error) => {
                let (marker, message) = load_error(&error);
                self.error(At::default(), marker, message);
                return;
            }
        };
        let Some(root) = root.as_mapping() else {
            self.error(
                At::default(),
                start(&root),
                "the file must be a mapping with a `sagas` key",
            );
            return;
        };
        self.check_keys(At::default(), root, DefinitionFile::keys(), "the file");
        let Some(list) = root.get_node("sagas") else {
            return; // reported as a missing key
        };
        let items = match list {
            Node::Sequence(seq) => seq.iter().collect(),
            node if is_null(node) => Vec::new(),
            node => {
                self.error(
                    At::default(),
                    start(node),
                    "wrong type: `sagas` must be a list of sagas",
                );
                return;
            }
        };
        for item in items {
            match item.as_mapping() {
                Some(map) => sagas.push(self.saga(map)),
                None => self.error(
                    At::default(),
                    start(item),
                    "wrong type: a saga must be a mapping with `name` and `steps`",
                ),
            }
        }
    }

    /// Reports unknown keys, and missing or empty required ones, of one mapping. Returns a copy
    /// serde can read whatever was wrong with the keys (unknown keys removed, missing required
    /// ones given an empty placeholder, null optional values removed), and the keys that were
    /// missing, so rules about their values are not reported a second time.
    fn check_keys(
        &mut self,
        at: At<'_>,
        map: &MarkedMappingNode,
        keys: &MappingKeys,
        what: &str,
    ) -> (MarkedMappingNode, Vec<String>) {
        let mut clean = map.clone();
        for (key, value) in map.iter() {
            let required = keys.required.iter().any(|k| k == key.as_str());
            if !keys.is_known(key.as_str()) {
                self.error(
                    at,
                    key.span().start().copied(),
                    format!(
                        "unknown key `{}` in {what}; expected one of {}",
                        key.as_str(),
                        keys.known
                            .iter()
                            .map(|k| format!("`{k}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
                clean.remove(key.as_str());
            } else if is_null(value) {
                if required {
                    // An empty value: kept as an empty string, reported by the rules on names.
                    clean.insert(key.clone(), empty_scalar(value));
                } else {
                    clean.remove(key.as_str());
                }
            }
        }
        let mut missing = Vec::new();
        for key in &keys.required {
            if !map.contains_key(key.as_str()) {
                self.error(
                    at,
                    map_at(map),
                    format!("missing required key `{key}` in {what}"),
                );
                let span = *map.span();
                clean.insert(
                    MarkedScalarNode::new(span, key.as_str()),
                    Node::from(MarkedScalarNode::new_empty(span)),
                );
                missing.push(key.clone());
            }
        }
        (clean, missing)
    }

    fn deserialise<T: serde::de::DeserializeOwned>(
        &mut self,
        at: At<'_>,
        map: MarkedMappingNode,
    ) -> Option<T> {
        let at_map = map_at(&map);
        let node = Node::from(map);
        match marked_yaml::from_node::<T>(&node) {
            Ok(value) => Some(value),
            Err(error) => {
                let marker = error.start_mark().or(at_map);
                self.error(at, marker, serde_message(&error));
                None
            }
        }
    }

    fn saga(&mut self, map: &MarkedMappingNode) -> Parsed {
        let name_at = value_at(map, "name");
        let raw_name = scalar(map, "name").unwrap_or_default();
        let at = At::saga(raw_name);
        let (mut clean, missing) = self.check_keys(at, map, SagaSpec::keys(), "a saga");
        // Steps are read one by one below, so a bad step hides nothing else.
        clean.insert(
            MarkedScalarNode::new(*map.span(), "steps"),
            Node::from(MarkedScalarNode::new_empty(*map.span())),
        );
        let header: Option<SagaSpec> = self.deserialise(at, clean);

        let mut steps = Vec::new();
        if let Some(list) = map.get_node("steps") {
            let items: Vec<&Node> = match list {
                Node::Sequence(seq) => seq.iter().collect(),
                node if is_null(node) => Vec::new(),
                node => {
                    self.error(
                        at,
                        start(node),
                        "wrong type: `steps` must be a list of steps",
                    );
                    return self.unfinished(at, name_at, &steps);
                }
            };
            if items.is_empty() {
                self.error(
                    at,
                    if is_null(list) {
                        key_at(map, "steps")
                    } else {
                        start(list)
                    },
                    "a saga needs at least one step: `steps` is empty",
                );
            }
            for (position, item) in items.into_iter().enumerate() {
                match item.as_mapping() {
                    Some(group) if group.contains_key("parallel") => {
                        let position = u32::try_from(position).unwrap_or(u32::MAX);
                        steps.extend(self.group(at, group, position));
                    }
                    Some(step) => {
                        if let Some(parsed) = self.step(at, step) {
                            steps.push(parsed);
                        }
                    }
                    None => self.error(
                        at,
                        start(item),
                        "wrong type: a step must be a mapping with `name`, `participant` and \
                         `action`",
                    ),
                }
            }
        }

        let Some(header) = header else {
            return self.unfinished(at, name_at, &steps);
        };

        if header.name.trim().is_empty() && !missing.iter().any(|k| k == "name") {
            self.error(
                at,
                key_at(map, "name").or_else(|| map_at(map)),
                "empty name: a saga's `name` must not be empty",
            );
        }
        let deadline = header
            .deadline
            .as_deref()
            .and_then(|text| self.duration(at, value_at(map, "deadline"), "deadline", text));
        let input_schema = match map.get_node("input_schema") {
            Some(node) if !is_null(node) => {
                let schema = to_json(node);
                if !matches!(schema, Value::Object(_) | Value::Bool(_)) {
                    self.error(
                        at,
                        start(node),
                        "wrong type: `input_schema` must be a JSON Schema (a mapping)",
                    );
                }
                Some(schema)
            }
            _ => None,
        };

        self.step_order(at, &steps);
        self.step_names(at, &steps);

        let mut def = SagaDefinition {
            name: header.name,
            version: String::new(),
            deadline,
            input_schema,
            steps: steps.into_iter().map(|s| s.def).collect(),
        };
        def.version = def.content_version();
        Parsed {
            file_index: self.file_index,
            name_at,
            def: Some(def),
        }
    }

    /// A saga whose own keys could not be read: still checks what can be checked across the
    /// steps that could.
    fn unfinished(&mut self, at: At<'_>, name_at: Option<Marker>, steps: &[ParsedStep]) -> Parsed {
        self.step_order(at, steps);
        self.step_names(at, steps);
        Parsed {
            file_index: self.file_index,
            name_at,
            def: None,
        }
    }

    /// Step names are unique within a saga.
    fn step_names(&mut self, at: At<'_>, steps: &[ParsedStep]) {
        let mut seen: HashMap<&str, Option<Marker>> = HashMap::new();
        for step in steps {
            let name = step.def.name.as_str();
            if name.is_empty() {
                continue;
            }
            match seen.get(name) {
                Some(first) => self.error(
                    at.step(name),
                    step.name_at,
                    format!(
                        "duplicate step name: `{name}` is already a step of this saga{}",
                        first
                            .map(|m| format!(" (line {})", m.line()))
                            .unwrap_or_default()
                    ),
                ),
                None => {
                    seen.insert(name, step.name_at);
                }
            }
        }
    }

    /// Checks the kinds of the steps that could be read: compensatable*, pivot?, retriable*.
    fn step_order(&mut self, at: At<'_>, steps: &[ParsedStep]) {
        const ORDER: &str =
            "the order must be compensatable steps, then at most one pivot, then retriable steps";
        let mut pivot: Option<&str> = None;
        let mut retriable: Option<&str> = None;
        for step in steps {
            let name = step.def.name.as_str();
            let at = at.step(name);
            match step.def.kind {
                StepKind::Compensatable => {
                    if let Some(later) = retriable.or(pivot) {
                        let which = if retriable.is_some() {
                            "retriable"
                        } else {
                            "pivot"
                        };
                        self.error(
                            at,
                            step.kind_at,
                            format!(
                                "steps out of order: compensatable step after the {which} step \
                                 `{later}`; {ORDER}"
                            ),
                        );
                    }
                }
                StepKind::Pivot => {
                    if let Some(first) = pivot {
                        self.error(
                            at,
                            step.kind_at,
                            format!(
                                "more than one pivot: `{first}` is already this saga's pivot; a \
                                 saga has at most one"
                            ),
                        );
                    } else {
                        if let Some(earlier) = retriable {
                            self.error(
                                at,
                                step.kind_at,
                                format!(
                                    "steps out of order: pivot step after the retriable step \
                                     `{earlier}`; {ORDER}"
                                ),
                            );
                        }
                        pivot = Some(name);
                    }
                }
                StepKind::Retriable => {
                    retriable.get_or_insert(name);
                }
            }
        }
    }

    /// A `parallel` group: its steps, marked with the group's `position` in the saga's list,
    /// once the rules of groups are checked (kinds, declared outputs, no nesting).
    fn group(&mut self, saga: At<'_>, map: &MarkedMappingNode, position: u32) -> Vec<ParsedStep> {
        self.check_keys(saga, map, ParallelSpec::keys(), "a `parallel` group");
        let list = map.get_node("parallel").expect("checked by the caller");
        let items: Vec<&Node> = match list {
            Node::Sequence(seq) => seq.iter().collect(),
            node if is_null(node) => Vec::new(),
            node => {
                self.error(
                    saga,
                    start(node),
                    "wrong type: `parallel` must be a list of steps",
                );
                return Vec::new();
            }
        };
        if items.is_empty() {
            self.error(
                saga,
                key_at(map, "parallel"),
                "empty group: `parallel` needs at least one step",
            );
        }
        let mut steps: Vec<ParsedStep> = Vec::new();
        for item in items {
            match item.as_mapping() {
                Some(nested) if nested.contains_key("parallel") => {
                    let first = nested
                        .get_sequence("parallel")
                        .and_then(|seq| seq.iter().next())
                        .and_then(|n| n.as_mapping())
                        .and_then(|m| scalar(m, "name"))
                        .unwrap_or_default();
                    self.error(
                        saga.step(first),
                        key_at(nested, "parallel"),
                        "nested group: a `parallel` group holds steps, not other groups",
                    );
                }
                Some(step) => {
                    if let Some(mut parsed) = self.step(saga, step) {
                        parsed.def.group = Some(position);
                        steps.push(parsed);
                    }
                }
                None => self.error(
                    saga,
                    start(item),
                    "wrong type: a step must be a mapping with `name`, `participant` and \
                     `action`",
                ),
            }
        }
        if steps.len() > 1 {
            self.group_rules(saga, &steps);
        }
        steps
    }

    /// The rules of a group of several steps: all compensatable (a pivot stands alone, and
    /// groups of retriable steps are not supported), each declaring its outputs, none twice.
    fn group_rules(&mut self, saga: At<'_>, steps: &[ParsedStep]) {
        const KINDS: &str = "a group's steps are all compensatable, or the group holds only the \
                             pivot";
        let first_compensatable = steps
            .iter()
            .find(|s| s.def.kind == StepKind::Compensatable)
            .map(|s| s.def.name.as_str());
        for step in steps {
            let at = saga.step(&step.def.name);
            match (step.def.kind, first_compensatable) {
                (StepKind::Compensatable, _) => {}
                (StepKind::Pivot, _) => self.error(
                    at,
                    step.kind_at,
                    format!(
                        "pivot in a group of {} steps: the pivot is the one go/no-go point and \
                         must be alone in its group; {KINDS}",
                        steps.len()
                    ),
                ),
                (StepKind::Retriable, Some(other)) => self.error(
                    at,
                    step.kind_at,
                    format!(
                        "mixed kinds in a group: `{}` is retriable and `{other}` \
                         compensatable; {KINDS}",
                        step.def.name
                    ),
                ),
                (StepKind::Retriable, None) => self.error(
                    at,
                    step.kind_at,
                    format!("a group of retriable steps is not supported; {KINDS}"),
                ),
            }
        }
        let mut declared: HashMap<&str, (&str, Option<Marker>)> = HashMap::new();
        for step in steps {
            let name = step.def.name.as_str();
            let Some(outputs) = &step.def.outputs else {
                self.error(
                    saga.step(name),
                    step.name_at,
                    "missing `outputs` on a step of a group: its siblings' replies arrive in any \
                     order, so each declares the data keys it writes (`outputs: []` for none)",
                );
                continue;
            };
            for (i, key) in outputs.iter().enumerate() {
                let marker = step.outputs_at.get(i).copied().flatten();
                match declared.get(key.as_str()) {
                    Some((other, other_at)) if *other != name => self.error(
                        saga.step(name),
                        marker,
                        format!(
                            "output key `{key}` is also written by `{other}`{}, in the same \
                             group: steps that run at once must write different keys",
                            other_at
                                .map(|m| format!(" (line {})", m.line()))
                                .unwrap_or_default()
                        ),
                    ),
                    Some(_) => {}
                    None => {
                        declared.insert(key, (name, marker));
                    }
                }
            }
        }
    }

    fn step(&mut self, saga: At<'_>, map: &MarkedMappingNode) -> Option<ParsedStep> {
        let name_at = value_at(map, "name");
        let raw_name = scalar(map, "name").unwrap_or_default();
        let at = saga.step(raw_name);
        let (mut clean, missing) = self.check_keys(at, map, StepSpec::keys(), "a step");
        for key in ["retry", "compensation_retry"] {
            if let Some(Node::Mapping(policy)) = clean.get_node(key) {
                let (policy, _) =
                    self.check_keys(at, policy, RetrySpec::keys(), &format!("`{key}`"));
                clean.insert(MarkedScalarNode::new(*map.span(), key), Node::from(policy));
            }
        }
        let spec: StepSpec = self.deserialise(at, clean)?;
        let is_missing = |key: &str| missing.iter().any(|k| k == key);

        for (key, value) in [
            ("name", Some(&spec.name)),
            ("participant", Some(&spec.participant)),
            ("action", Some(&spec.action)),
            ("compensation", spec.compensation.as_ref()),
        ] {
            if let Some(value) = value
                && value.trim().is_empty()
                && !is_missing(key)
            {
                self.error(
                    at,
                    key_at(map, key).or_else(|| map_at(map)),
                    format!("empty name: `{key}` must not be empty"),
                );
            }
        }
        if !spec.participant.trim().is_empty()
            && !saga_schemas::definition::is_participant_name(&spec.participant)
        {
            self.error(
                at,
                value_at(map, "participant"),
                format!(
                    "invalid participant name `{}`: it names an AMQP queue, so it may only \
                     contain letters, digits, `.`, `_` and `-`",
                    spec.participant
                ),
            );
        }

        let kind = match spec.kind {
            StepKindSpec::Compensatable => StepKind::Compensatable,
            StepKindSpec::Pivot => StepKind::Pivot,
            StepKindSpec::Retriable => StepKind::Retriable,
        };
        let kind_word = match kind {
            StepKind::Compensatable => "compensatable",
            StepKind::Pivot => "pivot",
            StepKind::Retriable => "retriable",
        };
        match (kind, &spec.compensation) {
            (StepKind::Compensatable, None) => self.error(
                at,
                map_at(map),
                "a compensatable step needs `compensation` (or declare `kind: pivot` or \
                 `kind: retriable`)",
            ),
            (StepKind::Pivot | StepKind::Retriable, Some(_)) => self.error(
                at,
                key_at(map, "compensation"),
                format!("a {kind_word} step must not have `compensation`: it is never compensated"),
            ),
            _ => {}
        }
        if kind != StepKind::Compensatable && spec.compensation_retry.is_some() {
            self.error(
                at,
                key_at(map, "compensation_retry"),
                format!(
                    "a {kind_word} step must not have `compensation_retry`: it is never \
                     compensated"
                ),
            );
        }

        if kind == StepKind::Retriable {
            if spec.expiry.is_some() {
                self.error(
                    at,
                    key_at(map, "expiry"),
                    "a retriable step must not have `expiry`: it comes after the point of no \
                     return and must always run",
                );
            }
            if let Some(policy) = spec.retry.as_ref()
                && policy.max_attempts.is_some()
            {
                let retry = map.get_mapping("retry");
                self.error(
                    at,
                    retry
                        .and_then(|m| key_at(m, "max_attempts"))
                        .or_else(|| key_at(map, "retry")),
                    "a retriable step must not have `retry.max_attempts`: it is retried until it \
                     succeeds (only `backoff` and `max_backoff` apply)",
                );
            }
        }

        let timeout = match &spec.timeout {
            Some(text) => self
                .duration(at, value_at(map, "timeout"), "timeout", text)
                .unwrap_or(DEFAULT_STEP_TIMEOUT),
            None => DEFAULT_STEP_TIMEOUT,
        };
        let expiry = match (&spec.expiry, kind) {
            (_, StepKind::Retriable) => None,
            (Some(text), _) => Some(
                self.duration(at, value_at(map, "expiry"), "expiry", text)
                    .unwrap_or(DEFAULT_EXPIRY),
            ),
            (None, _) => Some(DEFAULT_EXPIRY),
        };
        let retry = self.retry(at, map, "retry", spec.retry.as_ref(), DEFAULT_RETRY);
        let compensation_retry = self.retry(
            at,
            map,
            "compensation_retry",
            spec.compensation_retry.as_ref(),
            DEFAULT_COMPENSATION_RETRY,
        );

        let outputs_at = match map.get_node("outputs") {
            Some(Node::Sequence(seq)) => seq.iter().map(start).collect(),
            _ => Vec::new(),
        };
        Some(ParsedStep {
            name_at,
            kind_at: value_at(map, "kind").or_else(|| map_at(map)),
            outputs_at,
            def: StepDefinition {
                name: spec.name,
                participant: spec.participant,
                action: spec.action,
                compensation: spec.compensation,
                kind,
                timeout,
                expiry,
                retry,
                compensation_retry,
                group: None,
                outputs: spec.outputs,
            },
        })
    }

    fn retry(
        &mut self,
        at: At<'_>,
        step: &MarkedMappingNode,
        key: &str,
        spec: Option<&RetrySpec>,
        default: RetryPolicy,
    ) -> RetryPolicy {
        let Some(spec) = spec else { return default };
        let map = step.get_mapping(key);
        let value_of = |field: &str| map.and_then(|m| value_at(m, field));
        let mut policy = default;
        if let Some(n) = spec.max_attempts {
            match u32::try_from(n) {
                Ok(n) if n >= 1 => policy.max_attempts = n,
                _ if n < 1 => self.error(
                    at,
                    value_of("max_attempts"),
                    format!("`{key}.max_attempts` must be at least 1, got {n}"),
                ),
                _ => self.error(
                    at,
                    value_of("max_attempts"),
                    format!("`{key}.max_attempts` is too large: {n}"),
                ),
            }
        }
        let mut backoff_ok = true;
        for (field, slot) in [
            ("backoff", &spec.backoff),
            ("max_backoff", &spec.max_backoff),
        ] {
            if let Some(text) = slot {
                let name = format!("{key}.{field}");
                match self.duration(at, value_of(field), &name, text) {
                    Some(d) if field == "backoff" => policy.backoff = d,
                    Some(d) => policy.max_backoff = d,
                    None => backoff_ok = false,
                }
            }
        }
        if backoff_ok && policy.backoff > policy.max_backoff {
            let default_note = |set: bool| if set { "" } else { ", the default" };
            self.error(
                at,
                value_of("backoff")
                    .or_else(|| value_of("max_backoff"))
                    .or_else(|| key_at(step, key)),
                format!(
                    "`{key}.backoff` ({}{}) is greater than `{key}.max_backoff` ({}{})",
                    humantime::format_duration(policy.backoff),
                    default_note(spec.backoff.is_some()),
                    humantime::format_duration(policy.max_backoff),
                    default_note(spec.max_backoff.is_some()),
                ),
            );
        }
        policy
    }

    /// Parses a positive duration such as `250ms`, `5s`, `10m`, `1h`.
    fn duration(
        &mut self,
        at: At<'_>,
        marker: Option<Marker>,
        key: &str,
        text: &str,
    ) -> Option<Duration> {
        let trimmed = text.trim();
        if trimmed.starts_with('-') {
            self.error(
                at,
                marker,
                format!("`{key}` must be a positive duration, got `{trimmed}`"),
            );
            return None;
        }
        match humantime::parse_duration(trimmed) {
            Ok(d) if d.is_zero() => {
                self.error(
                    at,
                    marker,
                    format!("`{key}` must be greater than zero, got `{trimmed}`"),
                );
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                self.error(
                    at,
                    marker,
                    format!(
                        "invalid duration for `{key}`: `{trimmed}` ({e}); write e.g. `250ms`, \
                         `5s`, `10m` or `1h`"
                    ),
                );
                None
            }
        }
    }
}

struct ParsedStep {
    name_at: Option<Marker>,
    kind_at: Option<Marker>,
    /// Where each key of `outputs` is written.
    outputs_at: Vec<Option<Marker>>,
    def: StepDefinition,
}

/// The 1-based line where a second YAML document starts, if the text has more than one.
fn second_document(text: &str) -> Option<usize> {
    let mut documents = 0;
    let mut content = false;
    for (index, line) in text.lines().enumerate() {
        let is_marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t']));
        if is_marker {
            if content || documents > 0 {
                return Some(index + 1);
            }
            documents += 1;
        } else if !content {
            let trimmed = line.trim_start();
            content = !(trimmed.is_empty() || trimmed.starts_with('#') || line.starts_with('%'));
        }
    }
    None
}

/// Where a mapping is written: its first key (the loader marks a block mapping at the first
/// key's colon), else the mapping's own start.
fn map_at(map: &MarkedMappingNode) -> Option<Marker> {
    map.keys()
        .next()
        .and_then(|k| k.span().start())
        .or_else(|| map.span().start())
        .copied()
}

fn start(node: &Node) -> Option<Marker> {
    match node {
        Node::Mapping(map) => map_at(map),
        node => node.span().start().copied(),
    }
}

/// Where the value of `key` starts.
fn value_at(map: &MarkedMappingNode, key: &str) -> Option<Marker> {
    map.get_node(key).and_then(start)
}

/// Where `key` itself is written.
fn key_at(map: &MarkedMappingNode, key: &str) -> Option<Marker> {
    map.keys()
        .find(|k| k.as_str() == key)
        .and_then(|k| k.span().start().copied())
}

fn scalar<'a>(map: &'a MarkedMappingNode, key: &str) -> Option<&'a str> {
    map.get_scalar(key).map(|s| s.as_str())
}

/// A plain (unquoted) YAML null: empty, `~` or `null`.
fn is_null(node: &Node) -> bool {
    node.as_scalar().is_some_and(|s| {
        s.may_coerce() && matches!(s.as_str(), "" | "~" | "null" | "Null" | "NULL")
    })
}

fn empty_scalar(like: &Node) -> Node {
    let mut scalar = MarkedScalarNode::new_empty(*like.span());
    scalar.set_coerce(false);
    Node::from(scalar)
}

/// A YAML node as JSON, with plain scalars typed the way YAML types them (null, booleans,
/// numbers) and quoted scalars kept as strings.
fn to_json(node: &Node) -> Value {
    match node {
        Node::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v)))
                .collect(),
        ),
        Node::Sequence(seq) => Value::Array(seq.iter().map(to_json).collect()),
        Node::Scalar(s) => {
            if is_null(node) {
                Value::Null
            } else if let Some(b) = s.as_bool() {
                Value::Bool(b)
            } else if let Some(i) = s.as_i64() {
                Value::from(i)
            } else if let Some(u) = s.as_u64() {
                Value::from(u)
            } else if let Some(n) = s
                .as_f64()
                .filter(|_| s.as_str().bytes().any(|b| b.is_ascii_digit()))
                .and_then(serde_json::Number::from_f64)
            {
                Value::Number(n)
            } else {
                Value::String(s.as_str().to_owned())
            }
        }
    }
}

fn load_error(error: &LoadError) -> (Option<Marker>, String) {
    match error {
        LoadError::ScanError(marker, scan) => {
            (Some(*marker), format!("YAML syntax error: {}", scan.info()))
        }
        LoadError::TopLevelMustBeMapping(marker) => (
            Some(*marker),
            "the file must be a mapping with a `sagas` key".to_owned(),
        ),
        LoadError::TopLevelMustBeSequence(marker) => (
            Some(*marker),
            "the file must be a mapping with a `sagas` key".to_owned(),
        ),
        LoadError::UnexpectedAnchor(marker) => (
            Some(*marker),
            "YAML syntax error: anchors and aliases are not supported".to_owned(),
        ),
        LoadError::MappingKeyMustBeScalar(marker) => (
            Some(*marker),
            "YAML syntax error: mapping keys must be plain strings".to_owned(),
        ),
        LoadError::UnexpectedTag(marker) => (
            Some(*marker),
            "YAML syntax error: tags (`!name`) are not supported".to_owned(),
        ),
        LoadError::DuplicateKey(inner) => (
            inner.key.span().start().copied(),
            format!(
                "duplicate key `{}`{}",
                inner.key.as_str(),
                inner
                    .prev_key
                    .span()
                    .start()
                    .map(|m| format!(" (first at line {}, column {})", m.line(), m.column()))
                    .unwrap_or_default()
            ),
        ),
    }
}

fn serde_message(error: &FromNodeError) -> String {
    let inner: &marked_yaml::Error = error;
    match error.path() {
        Some(path) => format!("wrong type for `{path}`: {inner}"),
        None => format!("wrong type: {inner}"),
    }
}
