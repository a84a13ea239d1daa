//! `zmesh enroll` / `zmesh unenroll`: set or clear a namespace's enrollment label in a
//! manifest directory, as `kubectl label` does against a real cluster.

use std::path::{Path, PathBuf};

use crate::state::{CILIUM_MTLS_LABEL, ISTIO_DATAPLANE_LABEL};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    // The io::Error is the source (shown by error chains), not repeated in the message.
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid YAML, not edited: {reason}", path.display())]
    Yaml { path: PathBuf, reason: String },
    #[error("namespace {0:?} is not defined in {dir} (add a Namespace manifest first)", dir = .1.display())]
    NoSuchNamespace(String, PathBuf),
    #[error("namespace {namespace:?} is defined more than once ({}); nothing edited: keep one definition", places.join(", "))]
    Ambiguous {
        namespace: String,
        places: Vec<String>,
    },
    #[error("{}: cannot edit namespace {namespace:?} in place, not edited: {reason}; set the label by hand", path.display())]
    Unsupported {
        path: PathBuf,
        namespace: String,
        reason: String,
    },
}

/// What an enrollment edit did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Changed(PathBuf),
    AlreadyDone(PathBuf),
}

/// One YAML document of a file: its lines' byte range and its parsed value.
struct Document {
    start: usize,
    end: usize,
    value: serde_yaml_ng::Value,
}

/// Enrolls (`true`) or un-enrolls (`false`) `namespace`. Enrolling sets Cilium's label;
/// un-enrolling removes both projects' enrolling labels. Only the label lines of the one
/// Namespace document that defines it change: the rest of the file (comments, quoting, key
/// order, other documents) stays byte for byte, and the file is replaced atomically. Input
/// this cannot edit safely (a namespace defined twice, labels in flow style, ...) is an
/// error and nothing is written.
pub fn set_enrollment(dir: &Path, namespace: &str, enrolled: bool) -> Result<Outcome, EnrollError> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|source| EnrollError::Read {
            path: dir.to_owned(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")))
        .collect();
    files.sort();
    let mut found: Vec<(PathBuf, String, Vec<Document>, usize)> = Vec::new();
    for path in files {
        let text = std::fs::read_to_string(&path).map_err(|source| EnrollError::Read {
            path: path.clone(),
            source,
        })?;
        let documents = documents(&path, &text)?;
        for (i, d) in documents.iter().enumerate() {
            if d.value["kind"].as_str() == Some("Namespace")
                && d.value["metadata"]["name"].as_str() == Some(namespace)
            {
                found.push((path.clone(), text.clone(), Vec::new(), i));
            }
        }
        if let Some(last) = found.last_mut().filter(|f| f.0 == path) {
            last.2 = documents;
        }
    }
    let (path, text, docs, index) = match found.len() {
        0 => {
            return Err(EnrollError::NoSuchNamespace(
                namespace.to_owned(),
                dir.to_owned(),
            ))
        }
        1 => found.remove(0),
        _ => {
            return Err(EnrollError::Ambiguous {
                namespace: namespace.to_owned(),
                places: found
                    .iter()
                    .map(|(p, _, _, i)| format!("{}, document {}", p.display(), i + 1))
                    .collect(),
            })
        }
    };
    let doc = &docs[index];
    let mut wanted = doc.value.clone();
    if !edit_labels(&mut wanted, enrolled) {
        return Ok(Outcome::AlreadyDone(path));
    }
    let unsupported = |reason: String| EnrollError::Unsupported {
        path: path.clone(),
        namespace: namespace.to_owned(),
        reason,
    };
    let edited_doc =
        edit_text(&text[doc.start..doc.end], enrolled, &doc.value).map_err(unsupported)?;
    let edited = format!("{}{edited_doc}{}", &text[..doc.start], &text[doc.end..]);
    // The edit must mean exactly what was intended: the namespace's labels as wanted,
    // every other document as it was.
    let after = documents(&path, &edited).map_err(|e| unsupported(e.to_string()))?;
    let same_others = after.len() == docs.len()
        && after
            .iter()
            .zip(&docs)
            .enumerate()
            .all(|(i, (a, b))| i == index || a.value == b.value);
    if !same_others || after[index].value != wanted {
        return Err(unsupported(
            "the edited text would not hold exactly the intended labels".into(),
        ));
    }
    let tmp = path.with_extension("zmesh-tmp");
    std::fs::write(&tmp, edited).map_err(|source| EnrollError::Write {
        path: path.clone(),
        source,
    })?;
    std::fs::rename(&tmp, &path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        EnrollError::Write {
            path: path.clone(),
            source,
        }
    })?;
    Ok(Outcome::Changed(path))
}

/// The documents of a file, split at `---` lines (a line starting with `---` at column 0
/// is always a document marker in YAML), each parsed on its own.
fn documents(path: &Path, text: &str) -> Result<Vec<Document>, EnrollError> {
    use serde::Deserialize;
    // The whole file first: its errors name the right line.
    for document in serde_yaml_ng::Deserializer::from_str(text) {
        serde_yaml_ng::Value::deserialize(document).map_err(|e| EnrollError::Yaml {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    let mut out = Vec::new();
    let mut start = 0;
    let mut offset = 0;
    let mut push = |start: usize, end: usize| -> Result<(), EnrollError> {
        let value: serde_yaml_ng::Value =
            serde_yaml_ng::from_str(&text[start..end]).map_err(|e| EnrollError::Yaml {
                path: path.to_owned(),
                reason: e.to_string(),
            })?;
        out.push(Document { start, end, value });
        Ok(())
    };
    for line in text.split_inclusive('\n') {
        if line.starts_with("---") && offset > 0 {
            push(start, offset)?;
            start = offset;
        }
        offset += line.len();
    }
    push(start, text.len())?;
    Ok(out)
}

/// Returns whether anything changed.
fn edit_labels(ns: &mut serde_yaml_ng::Value, enrolled: bool) -> bool {
    use serde_yaml_ng::Value;
    let metadata = &mut ns["metadata"];
    if metadata.get("labels").is_none_or(Value::is_null) {
        metadata["labels"] = Value::Mapping(Default::default());
    }
    let Some(labels) = metadata["labels"].as_mapping_mut() else {
        return false;
    };
    let cilium = Value::from(CILIUM_MTLS_LABEL);
    let istio = Value::from(ISTIO_DATAPLANE_LABEL);
    let is_enrolled = labels.get(&cilium).and_then(Value::as_str) == Some("true")
        || labels.get(&istio).and_then(Value::as_str) == Some("ambient");
    match (enrolled, is_enrolled) {
        (true, true) | (false, false) => false,
        (true, false) => {
            labels.insert(cilium, Value::from("true"));
            true
        }
        (false, true) => {
            labels.remove(&cilium);
            if labels.get(&istio).and_then(Value::as_str) == Some("ambient") {
                labels.remove(&istio);
            }
            true
        }
    }
}

/// A line of a block mapping: its indentation, key (unquoted) and where its value starts.
struct Entry<'a> {
    indent: usize,
    key: String,
    /// The text after `key:`, comment included.
    rest: &'a str,
}

/// Parses `line` (without its line break) as `key: value` of a block mapping; None for
/// blank lines, comments and anything else.
fn entry(line: &str) -> Option<Entry<'_>> {
    let body = line.trim_start_matches(' ');
    let indent = line.len() - body.len();
    if body.is_empty() || body.starts_with('#') {
        return None;
    }
    let (key, after) = match body.as_bytes()[0] {
        q @ (b'"' | b'\'') => {
            let close = body[1..].find(q as char)? + 1;
            (body[1..close].to_owned(), &body[close + 1..])
        }
        _ => {
            let colon = body
                .char_indices()
                .find(|&(i, c)| {
                    c == ':' && matches!(body.as_bytes().get(i + 1), None | Some(b' ' | b'\r'))
                })?
                .0;
            (body[..colon].trim_end().to_owned(), &body[colon..])
        }
    };
    let rest = after.strip_prefix(':')?;
    Some(Entry { indent, key, rest })
}

/// Whether a line is blank or only a comment.
fn is_trivia(line: &str) -> bool {
    let t = line.trim();
    t.is_empty() || t.starts_with('#')
}

fn indent_of(line: &str) -> usize {
    line.len() - line.trim_start_matches(' ').len()
}

/// The value part of `rest` (after `key:`), without a trailing comment.
fn value_of(rest: &str) -> &str {
    let rest = rest.trim();
    if let Some(q @ ('"' | '\'')) = rest.chars().next() {
        if let Some(close) = rest[1..].find(q) {
            return &rest[..close + 2];
        }
        return rest;
    }
    match rest.find(" #") {
        Some(i) => rest[..i].trim_end(),
        None if rest.starts_with('#') => "",
        None => rest,
    }
}

/// Edits the label lines of one Namespace document's text. Errors say why the text is
/// not one this can edit (the caller leaves the file alone).
fn edit_text(doc: &str, enrolled: bool, parsed: &serde_yaml_ng::Value) -> Result<String, String> {
    let newline = if doc.contains("\r\n") { "\r\n" } else { "\n" };
    let mut lines: Vec<String> = doc.split_inclusive('\n').map(str::to_owned).collect();
    let bare = |l: &str| l.trim_end_matches(['\n', '\r']).to_owned();
    // `metadata:` at the top level of the document, in block style.
    let meta = lines
        .iter()
        .position(|l| entry(&bare(l)).is_some_and(|e| e.indent == 0 && e.key == "metadata"))
        .ok_or("no top-level `metadata:` line")?;
    if !value_of(entry(&bare(&lines[meta])).map_or("", |e| e.rest)).is_empty() {
        return Err("metadata is written in flow style".into());
    }
    // Its block: the lines after it, up to the next top-level line.
    let meta_end = (meta + 1..lines.len())
        .find(|&i| !is_trivia(&lines[i]) && indent_of(&lines[i]) == 0)
        .unwrap_or(lines.len());
    let child_indent = (meta + 1..meta_end)
        .find(|&i| !is_trivia(&lines[i]))
        .map(|i| indent_of(&lines[i]))
        .ok_or("metadata is empty")?;
    let labels_line = (meta + 1..meta_end).find(|&i| {
        entry(&bare(&lines[i])).is_some_and(|e| e.indent == child_indent && e.key == "labels")
    });
    let quoted_true = "\"true\"";
    let Some(labels_line) = labels_line else {
        if !enrolled {
            return Err("no labels to remove".into());
        }
        // After the last line of metadata's block (before trailing comments and blanks).
        let last = (meta + 1..meta_end)
            .rev()
            .find(|&i| !is_trivia(&lines[i]))
            .unwrap_or(meta);
        let pad = " ".repeat(child_indent);
        lines.insert(
            last + 1,
            format!("{pad}labels:{newline}{pad}{pad}{CILIUM_MTLS_LABEL}: {quoted_true}{newline}"),
        );
        return Ok(lines.concat());
    };
    let labels_text = bare(&lines[labels_line]);
    let labels_entry = entry(&labels_text).ok_or("unreadable labels line")?;
    let labels_value = value_of(labels_entry.rest).to_owned();
    let labels_end = (labels_line + 1..meta_end)
        .find(|&i| !is_trivia(&lines[i]) && indent_of(&lines[i]) <= child_indent)
        .unwrap_or(meta_end);
    let label_lines: Vec<usize> = (labels_line + 1..labels_end)
        .filter(|&i| !is_trivia(&lines[i]))
        .collect();
    match labels_value.as_str() {
        "" => {}
        "{}" | "null" | "~" if label_lines.is_empty() => {
            if !enrolled {
                return Err("no labels to remove".into());
            }
            let pad = " ".repeat(child_indent);
            lines[labels_line] = format!(
                "{pad}labels:{newline}{pad}{pad}{CILIUM_MTLS_LABEL}: {quoted_true}{newline}"
            );
            return Ok(lines.concat());
        }
        other => {
            return Err(format!(
                "labels are written in flow style ({other}); rewrite them one per line"
            ))
        }
    }
    let entry_indent = label_lines
        .first()
        .map(|&i| indent_of(&lines[i]))
        .unwrap_or(child_indent + 2);
    let mut labels: Vec<(usize, String)> = Vec::new();
    for &i in &label_lines {
        let line = bare(&lines[i]);
        let e = entry(&line)
            .filter(|e| e.indent == entry_indent && !value_of(e.rest).is_empty())
            .ok_or_else(|| {
                format!(
                    "label line {:?} is not `key: value` on one line",
                    line.trim()
                )
            })?;
        labels.push((i, e.key));
    }
    let line_of = |key: &str| labels.iter().find(|(_, k)| k == key).map(|(i, _)| *i);
    if enrolled {
        // Replace a present value (e.g. "false"), or add the label after the last one.
        let pad = " ".repeat(entry_indent);
        match line_of(CILIUM_MTLS_LABEL) {
            Some(i) => {
                let line = bare(&lines[i]);
                let e = entry(&line).ok_or("unreadable label line")?;
                let value = value_of(e.rest);
                let at = line.rfind(value).ok_or("unreadable label value")?;
                lines[i] = format!(
                    "{}{quoted_true}{}{newline}",
                    &line[..at],
                    &line[at + value.len()..]
                );
            }
            None => {
                let after = labels.last().map_or(labels_line, |(i, _)| *i);
                lines.insert(
                    after + 1,
                    format!("{pad}{CILIUM_MTLS_LABEL}: {quoted_true}{newline}"),
                );
            }
        }
    } else {
        let istio_ambient =
            parsed["metadata"]["labels"][ISTIO_DATAPLANE_LABEL].as_str() == Some("ambient");
        let mut remove: Vec<usize> = line_of(CILIUM_MTLS_LABEL).into_iter().collect();
        if istio_ambient {
            remove.extend(line_of(ISTIO_DATAPLANE_LABEL));
        }
        remove.sort_unstable();
        let none_left = remove.len() == labels.len();
        if none_left && labels_text.contains('#') {
            return Err("a comment on the labels line".into());
        }
        for i in remove.into_iter().rev() {
            lines.remove(i);
        }
        if none_left {
            // No label left: `labels: {}` rather than a dangling `labels:` (null).
            lines[labels_line] = format!("{labels_text} {{}}{newline}");
        }
    }
    Ok(lines.concat())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifests::ManifestDir;

    fn enrolled(dir: &Path, ns: &str) -> bool {
        let (state, errors) = ManifestDir::new(dir).rescan();
        assert!(errors.is_empty(), "{errors:?}");
        state.unwrap().namespace(ns).unwrap().enrolls_pods()
    }

    #[test]
    fn enroll_and_unenroll_edit_only_the_namespace() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ns.yaml"),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: ambient\n  labels:\n    istio.io/dataplane-mode: ambient\n    team: a\n",
        )
        .unwrap();
        assert!(!enrolled(dir.path(), "shop"));
        let file = dir.path().join("ns.yaml");
        assert_eq!(
            set_enrollment(dir.path(), "shop", true).unwrap(),
            Outcome::Changed(file.clone())
        );
        assert!(enrolled(dir.path(), "shop"));
        assert_eq!(
            set_enrollment(dir.path(), "shop", true).unwrap(),
            Outcome::AlreadyDone(file.clone())
        );
        // Istio's label enrolls too; un-enrolling removes it but keeps other labels.
        assert!(enrolled(dir.path(), "ambient"));
        set_enrollment(dir.path(), "ambient", false).unwrap();
        assert!(!enrolled(dir.path(), "ambient"));
        assert!(std::fs::read_to_string(&file).unwrap().contains("team: a"));
        assert!(
            enrolled(dir.path(), "shop"),
            "other namespaces are untouched"
        );
    }

    #[test]
    fn unknown_namespace_and_bad_yaml_are_errors_and_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, "kind: [unclosed").unwrap();
        assert!(matches!(
            set_enrollment(dir.path(), "shop", true),
            Err(EnrollError::Yaml { .. })
        ));
        assert_eq!(std::fs::read_to_string(&bad).unwrap(), "kind: [unclosed");
        std::fs::remove_file(&bad).unwrap();
        assert!(matches!(
            set_enrollment(dir.path(), "shop", true),
            Err(EnrollError::NoSuchNamespace(..))
        ));
    }

    const COMMENTED: &str = "\
# Namespaces of the shop. Keep this comment.
---
kind: Namespace   # kind first, on purpose
apiVersion: v1
metadata:
  name: shop
  labels:
    # the owning team
    team: 'payments'
    tier: \"1\"   # quoted, a string
  annotations:
    note: x
---
apiVersion: v1
kind: Namespace
metadata: {name: other, labels: {team: b}}
";

    #[test]
    fn comments_quoting_and_key_order_survive_enroll_and_unenroll() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.yaml");
        std::fs::write(&file, COMMENTED).unwrap();
        set_enrollment(dir.path(), "shop", true).unwrap();
        let enrolled_text = std::fs::read_to_string(&file).unwrap();
        // exactly one line added, after the last label, at the labels' indentation
        assert_eq!(
            enrolled_text,
            COMMENTED.replace(
                "    tier: \"1\"   # quoted, a string\n",
                "    tier: \"1\"   # quoted, a string\n    io.cilium/mtls-enabled: \"true\"\n"
            )
        );
        assert!(enrolled(dir.path(), "shop"));
        // and un-enrolling gives the original back, byte for byte
        set_enrollment(dir.path(), "shop", false).unwrap();
        assert_eq!(std::fs::read_to_string(&file).unwrap(), COMMENTED);
        assert!(!enrolled(dir.path(), "shop"));
    }

    #[test]
    fn a_present_value_is_replaced_in_place_and_missing_labels_are_added() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("ns.yaml");
        let opted_out = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    'io.cilium/mtls-enabled': 'false' # opted out\n    team: a\n";
        std::fs::write(&file, opted_out).unwrap();
        set_enrollment(dir.path(), "shop", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            opted_out.replace("'false' # opted out", "\"true\" # opted out")
        );
        // Removing the last label leaves an empty mapping.
        let only = "kind: Namespace\napiVersion: v1\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n";
        std::fs::write(&file, only).unwrap();
        set_enrollment(dir.path(), "shop", false).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "kind: Namespace\napiVersion: v1\nmetadata:\n  name: shop\n  labels: {}\n"
        );
        assert!(!enrolled(dir.path(), "shop"));
        // No labels at all: a labels block at the end of metadata; comments after it stay.
        let bare = "apiVersion: v1\nkind: Namespace\nmetadata:\n    name: shop  # four spaces\n# trailing comment\n";
        std::fs::write(&file, bare).unwrap();
        set_enrollment(dir.path(), "shop", true).unwrap();
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            "apiVersion: v1\nkind: Namespace\nmetadata:\n    name: shop  # four spaces\n    labels:\n        io.cilium/mtls-enabled: \"true\"\n# trailing comment\n"
        );
        assert!(enrolled(dir.path(), "shop"));
    }

    #[test]
    fn ambiguous_or_uneditable_input_is_an_error_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.yaml");
        let b = dir.path().join("b.yml");
        let ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n";
        std::fs::write(&a, ns).unwrap();
        std::fs::write(&b, ns).unwrap();
        let e = set_enrollment(dir.path(), "shop", true).unwrap_err();
        assert!(matches!(e, EnrollError::Ambiguous { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("a.yaml, document 1") && text.contains("b.yml, document 1"),
            "{text}"
        );
        assert_eq!(std::fs::read_to_string(&a).unwrap(), ns);
        assert_eq!(std::fs::read_to_string(&b).unwrap(), ns);
        std::fs::remove_file(&b).unwrap();

        // Flow-style labels or metadata: refused with the reason, file untouched.
        for flow in [
            "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels: {team: a}\n",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
        ] {
            std::fs::write(&a, flow).unwrap();
            let e = set_enrollment(dir.path(), "shop", true).unwrap_err();
            assert!(matches!(e, EnrollError::Unsupported { .. }), "{e}");
            assert!(e.to_string().contains("flow style"), "{e}");
            assert_eq!(std::fs::read_to_string(&a).unwrap(), flow);
            assert!(!dir.path().join("a.zmesh-tmp").exists());
        }
    }
}
