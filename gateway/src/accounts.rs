//! Operating-system accounts by name or number, read from `/etc/group` and `/etc/passwd`
//! (no NSS lookup: the crate keeps `unsafe` to `sockopt`; an account only a directory service
//! knows is given by its number).

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

/// The name of the user whose id is `uid`, from `/etc/passwd`; `None` when it has no entry.
pub fn user_name(uid: u32) -> std::io::Result<Option<String>> {
    let users = std::fs::read_to_string("/etc/passwd")?;
    Ok(user_in(&users, uid).map(str::to_owned))
}

/// The name of user `uid` in an `/etc/passwd` text (the first entry with that id, as
/// `getpwuid` finds it).
fn user_in(users: &str, uid: u32) -> Option<&str> {
    users.lines().find_map(|line| {
        let mut fields = line.split(':');
        let name = fields.next()?;
        (fields.nth(1)?.parse() == Ok(uid)).then_some(name)
    })
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
    fn users_are_found_by_id() {
        let users = "root:x:0:0:root:/root:/bin/bash\npostgres:x:104:111::/var/lib/postgresql:/bin/bash\ntoor:x:0:0::/:/bin/sh\n";
        assert_eq!(user_in(users, 104), Some("postgres"));
        assert_eq!(
            user_in(users, 0),
            Some("root"),
            "the first entry with the id"
        );
        assert_eq!(user_in(users, 111), None, "a group id is no user id");
        assert_eq!(user_name(0).unwrap().as_deref(), Some("root"));
    }
}
