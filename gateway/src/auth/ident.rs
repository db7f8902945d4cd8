//! PostgreSQL's user name maps (`pg_ident.conf`, as PostgreSQL 15 reads it): which
//! operating-system users (`peer`) and certificate common names (`cert`,
//! `tls.client_cert = "verify-full"`) may log in as which roles.

use std::path::Path;
use std::sync::Arc;

/// The lines of one map (`auth.ident_map`) of an ident file (`auth.ident_file`).
#[derive(Debug, Default)]
pub struct IdentMap {
    entries: Vec<Entry>,
}

#[derive(Debug)]
struct Entry {
    system: SystemName,
    role: String,
}

/// The system-user field of a line.
#[derive(Debug)]
enum SystemName {
    /// A name, compared exactly.
    Exact(String),
    /// `/regex`: matched anywhere in the name (anchor it with `^` and `$`); its first
    /// capture group replaces a `\1` in the role.
    Pattern(regex::Regex),
}

impl IdentMap {
    /// The map `auth.ident_map` of `auth.ident_file`, when they are set.
    pub fn load(auth: &crate::config::Auth) -> Result<Option<Arc<Self>>, String> {
        match (&auth.ident_file, &auth.ident_map) {
            (Some(path), Some(map)) => Ok(Some(Arc::new(Self::read(path, map)?))),
            _ => Ok(None),
        }
    }

    /// Reads the lines of map `map` from the file at `path`.
    pub fn read(path: &Path, map: &str) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Self::parse(&text, map).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The lines of map `map` in an ident file's text: `MAPNAME SYSTEM-USERNAME PG-USERNAME`,
    /// fields separated by blanks, double-quoted where they hold blanks or `#`, and `#`
    /// beginning a comment. Other maps' lines are checked too, as PostgreSQL checks the whole
    /// file.
    fn parse(text: &str, map: &str) -> Result<Self, String> {
        let mut entries = Vec::new();
        for (number, line) in text.lines().enumerate() {
            let at = |why: String| format!("line {}: {why}", number + 1);
            let fields = tokens(line).map_err(at)?;
            let [name, system, role] = match <[String; 3]>::try_from(fields) {
                Ok(fields) => fields,
                Err(fields) if fields.is_empty() => continue,
                Err(fields) => {
                    return Err(at(format!(
                        "{} fields where a map line has 3 (MAPNAME SYSTEM-USERNAME PG-USERNAME)",
                        fields.len()
                    )))
                }
            };
            let system = match system.strip_prefix('/') {
                Some(pattern) => SystemName::Pattern(
                    regex::Regex::new(pattern)
                        .map_err(|e| at(format!("invalid regular expression: {e}")))?,
                ),
                None => SystemName::Exact(system),
            };
            if name == map {
                entries.push(Entry { system, role });
            }
        }
        Ok(Self { entries })
    }

    /// Whether `system` (an operating-system user, a common name) may log in as `role`.
    pub fn allows(&self, system: &str, role: &str) -> bool {
        self.entries.iter().any(|entry| match &entry.system {
            SystemName::Exact(name) => name == system && entry.role == role,
            SystemName::Pattern(pattern) => {
                let Some(captures) = pattern.captures(system) else {
                    return false;
                };
                // PostgreSQL replaces the first `\1` only, and a `\1` with no group to take
                // it from matches nothing.
                match (entry.role.split_once("\\1"), captures.get(1)) {
                    (Some((before, after)), Some(group)) => {
                        role.strip_prefix(before)
                            .and_then(|rest| rest.strip_suffix(after))
                            == Some(group.as_str())
                    }
                    (Some(_), None) => false,
                    (None, _) => entry.role == role,
                }
            }
        })
    }
}

/// The fields of one line, as PostgreSQL's `next_token` splits them.
fn tokens(line: &str) -> Result<Vec<String>, String> {
    let mut fields = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        match chars.peek() {
            None | Some('#') => return Ok(fields),
            Some(_) => {}
        }
        let mut field = String::new();
        let mut quoted = false;
        while let Some(&c) = chars.peek() {
            match c {
                '"' if quoted && chars.clone().nth(1) == Some('"') => {
                    field.push('"');
                    chars.nth(1);
                    continue;
                }
                '"' => quoted = !quoted,
                c if !quoted && (c.is_whitespace() || c == '#' || c == ',') => break,
                c => field.push(c),
            }
            chars.next();
        }
        if quoted {
            return Err("unterminated quoted string".to_owned());
        }
        fields.push(field);
        if chars.next_if_eq(&',').is_some() {
            return Err("a list where one name belongs".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
# MAPNAME   SYSTEM-USERNAME        PG-USERNAME
app         deploy                 app_rw   # the deploy account
app         "build agent"          app_ro
app         /^(.*)@example\.com$   \1
app         /^svc-(.*)$            \1_service
other       root                   postgres
"#;

    #[test]
    fn lines_of_the_map_allow_their_pairs() {
        let map = IdentMap::parse(FILE, "app").unwrap();
        assert!(map.allows("deploy", "app_rw"));
        assert!(!map.allows("deploy", "app_ro"), "another role");
        assert!(!map.allows("Deploy", "app_rw"), "names compare exactly");
        assert!(map.allows("build agent", "app_ro"), "a quoted name");
        assert!(map.allows("alice@example.com", "alice"));
        assert!(!map.allows("alice@example.com", "bob"));
        assert!(!map.allows("alice@example.org", "alice"));
        assert!(map.allows("svc-billing", "billing_service"));
        assert!(!map.allows("svc-billing", "billing"));
        assert!(!map.allows("root", "postgres"), "another map's line");
        assert!(IdentMap::parse(FILE, "other")
            .unwrap()
            .allows("root", "postgres"));
        assert!(!IdentMap::parse(FILE, "none")
            .unwrap()
            .allows("deploy", "app_rw"));
    }

    #[test]
    fn a_pattern_without_a_group_compares_the_role_whole() {
        let map = IdentMap::parse("m /^ops-[a-z]+$ dba\nm /x \\1\n", "m").unwrap();
        assert!(map.allows("ops-anna", "dba"));
        assert!(!map.allows("ops-anna", "ops"));
        // `\1` with no group to take it from matches nothing.
        assert!(!map.allows("x", "\\1"));
        assert!(!map.allows("x", "x"));
    }

    #[test]
    fn malformed_lines_are_errors_that_say_where() {
        for (text, why) in [
            ("m deploy\n", "line 1: 2 fields"),
            ("\nm a b c\n", "line 2: 4 fields"),
            ("m \"deploy app_rw\n", "line 1: unterminated"),
            ("m /(unclosed app\n", "line 1: invalid regular expression"),
            ("m a,b app\n", "line 1: a list"),
        ] {
            let e = IdentMap::parse(text, "m").unwrap_err();
            assert!(e.starts_with(why), "{text:?}: {e}");
        }
        let quotes = IdentMap::parse("m \"say \"\"hi\"\"\" r\n", "m").unwrap();
        assert!(quotes.allows("say \"hi\"", "r"));
    }
}
