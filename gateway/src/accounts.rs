//! Operating-system accounts by name or number, looked up as PostgreSQL looks them up: through
//! the C library's name service (`getpwuid_r`, `getpwnam_r`, `getgrnam_r`), so an account a
//! directory service knows (LDAP through sssd, systemd's dynamic users) counts as one in
//! `/etc/passwd` does. A lookup may wait on that service: the data path calls them off its
//! threads.

use std::path::PathBuf;

use nix::unistd::{Group, Uid};

/// The id of the group `name`: a number as it is, or a name the system knows.
pub fn group_id(name: &str) -> std::io::Result<u32> {
    if let Ok(gid) = name.parse() {
        return Ok(gid);
    }
    match Group::from_name(name)? {
        Some(group) => Ok(group.gid.as_raw()),
        None => Err(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("unix_socket_group: the system knows no group {name:?} (give its number)"),
        )),
    }
}

/// An operating-system user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// User id.
    pub uid: u32,
    /// Primary group id.
    pub gid: u32,
    /// Home directory.
    pub home: PathBuf,
}

impl From<nix::unistd::User> for User {
    fn from(user: nix::unistd::User) -> Self {
        User {
            uid: user.uid.as_raw(),
            gid: user.gid.as_raw(),
            home: user.dir,
        }
    }
}

/// The user named `name`; `None` when the system knows none.
pub fn user_named(name: &str) -> std::io::Result<Option<User>> {
    Ok(nix::unistd::User::from_name(name)?.map(User::from))
}

/// The name of the user whose id is `uid`; `None` when the system knows none.
pub fn user_name(uid: u32) -> std::io::Result<Option<String>> {
    Ok(nix::unistd::User::from_uid(Uid::from_raw(uid))?.map(|u| u.name))
}

/// This process's effective user id.
pub fn effective_uid() -> u32 {
    Uid::effective().as_raw()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The entries `getent` (the C library's own lookup) gives for `database` and `key`,
    /// split into fields.
    fn getent(database: &str, key: &str) -> Option<Vec<String>> {
        let out = std::process::Command::new("getent")
            .args([database, key])
            .output()
            .expect("getent runs");
        let line = String::from_utf8(out.stdout).unwrap();
        let line = line.lines().next()?;
        Some(line.split(':').map(str::to_owned).collect())
    }

    #[test]
    fn users_are_what_the_system_says() {
        for name in ["root", "postgres", "nobody"] {
            let Some(entry) = getent("passwd", name) else {
                continue;
            };
            let user = user_named(name).unwrap().expect("a user getent knows");
            assert_eq!(user.uid.to_string(), entry[2], "{name}");
            assert_eq!(user.gid.to_string(), entry[3], "{name}");
            assert_eq!(user.home, PathBuf::from(&entry[5]), "{name}");
            assert_eq!(user_name(user.uid).unwrap().as_deref(), Some(name));
        }
        assert_eq!(user_name(0).unwrap().as_deref(), Some("root"));
        assert_eq!(user_named("no-such-user-here").unwrap(), None);
        assert_eq!(getent("passwd", "4294967"), None);
        assert_eq!(user_name(4_294_967).unwrap(), None);
    }

    #[test]
    fn groups_are_found_by_name_or_number() {
        assert_eq!(group_id("4242").unwrap(), 4242);
        assert_eq!(group_id("root").unwrap(), 0);
        if let Some(entry) = getent("group", "postgres") {
            assert_eq!(group_id("postgres").unwrap().to_string(), entry[2]);
        }
        let e = group_id("no-such-group-here").unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::NotFound);
        assert!(e.to_string().contains("give its number"), "{e}");
    }

    #[test]
    fn effective_uid_is_the_process_s() {
        let id = std::process::Command::new("id").arg("-u").output().unwrap();
        let id = String::from_utf8(id.stdout).unwrap();
        assert_eq!(effective_uid().to_string(), id.trim());
    }
}
