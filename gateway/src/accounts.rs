//! Operating-system accounts by name or number, read from `/etc/group`, `/etc/passwd` and
//! `/proc/self/status` (no NSS lookup: the crate keeps `unsafe` to `sockopt`; an account only
//! a directory service knows is given by its number).

use std::path::PathBuf;

/// The id of the group `name`: a number as it is, or a name looked up in `/etc/group` (a
/// group only a directory service knows is given by its number).
pub fn group_id(name: &str) -> std::io::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group")?;
    group_in(&groups, name).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("unix_socket_group: no group {name:?} in /etc/group (give its number)"),
        )
    })
}

/// The id of group `name` in an `/etc/group` text.
fn group_in(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        fields.nth(1)?.parse().ok()
    })
}

/// A user's entry in `/etc/passwd`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

/// The entries of an `/etc/passwd` text, each with its name, in the file's order; lines that
/// are no entry are passed over.
fn users(passwd: &str) -> impl Iterator<Item = (&str, User)> {
    passwd.lines().filter_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        if fields.len() < 7 {
            return None;
        }
        let user = User {
            uid: fields[2].parse().ok()?,
            gid: fields[3].parse().ok()?,
            home: PathBuf::from(fields[5]),
        };
        Some((fields[0], user))
    })
}

/// The entry of user `name` in `/etc/passwd`; `None` when it has none.
pub fn user_named(name: &str) -> std::io::Result<Option<User>> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let user = users(&passwd).find(|(n, _)| *n == name).map(|(_, u)| u);
    Ok(user)
}

/// The name of the user whose id is `uid`, from `/etc/passwd` (the first entry with that id,
/// as `getpwuid` finds it); `None` when it has no entry.
pub fn user_name(uid: u32) -> std::io::Result<Option<String>> {
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    let name = users(&passwd)
        .find(|(_, u)| u.uid == uid)
        .map(|(n, _)| n.to_owned());
    Ok(name)
}

/// This process's effective user id, from `/proc/self/status`.
pub fn effective_uid() -> std::io::Result<u32> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    effective_uid_in(&status).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "no Uid line in /proc/self/status",
        )
    })
}

/// The effective uid field of a `/proc/<pid>/status` text.
fn effective_uid_in(status: &str) -> Option<u32> {
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line.split_whitespace().nth(2)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_found_by_name_or_number() {
        let groups = "root:x:0:\npostgres:x:104:\nssl-cert:x:105:postgres\n";
        assert_eq!(group_in(groups, "postgres"), Some(104));
        assert_eq!(group_in(groups, "ssl-cert"), Some(105));
        assert_eq!(group_in(groups, "post"), None);
        assert_eq!(group_id("4242").unwrap(), 4242);
        assert_eq!(group_id("root").unwrap(), 0);
        let e = group_id("no-such-group-here").unwrap_err();
        assert!(e.to_string().contains("give its number"), "{e}");
    }

    #[test]
    fn users_are_found_by_name_or_id() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\n\
                      postgresql:x:5:5::/nope:/bin/false\n\
                      broken:x:abc:1::/:/bin/sh\n\
                      postgres:x:101:104:PostgreSQL administrator,,,:/var/lib/postgresql:/bin/bash\n\
                      toor:x:0:0::/:/bin/sh\n";
        let named = |name: &str| users(passwd).find(|(n, _)| *n == name).map(|(_, u)| u);
        assert_eq!(
            named("postgres"),
            Some(User {
                uid: 101,
                gid: 104,
                home: PathBuf::from("/var/lib/postgresql")
            })
        );
        assert_eq!(named("nobody"), None);
        assert_eq!(named("broken"), None, "a uid that is no number");
        let by_id = |uid: u32| users(passwd).find(|(_, u)| u.uid == uid).map(|(n, _)| n);
        assert_eq!(by_id(101), Some("postgres"));
        assert_eq!(by_id(0), Some("root"), "the first entry with the id");
        assert_eq!(by_id(104), None, "a group id is no user id");
        assert_eq!(user_name(0).unwrap().as_deref(), Some("root"));
        assert_eq!(user_named("root").unwrap().map(|u| u.uid), Some(0));
    }

    #[test]
    fn effective_uid_is_the_second_uid_field() {
        let status = "Name:\tx\nUmask:\t0022\nUid:\t1000\t0\t0\t0\nGid:\t100\t100\t100\t100\n";
        assert_eq!(effective_uid_in(status), Some(0));
        assert_eq!(effective_uid_in("Name:\tx\n"), None);
        assert!(effective_uid().is_ok());
    }
}
