//! Who may do what (DESIGN.md, "Authorization"): root always; a VM's owner for the everyday
//! lifecycle of that VM; everyone else through polkit (org.vmd.vmd1.create, .manage,
//! .host-files, .network), with the VM's name in the details. Callers are identified by what
//! the bus (or the socket) says about them, never by anything they say about themselves.

use std::collections::HashMap;

use zbus::message::{Flags, Header};
use zbus::{Connection, OwnedVariant, Variant};

use super::errors::VmdError;

/// The polkit actions of vmd (dbus/org.vmd.vmd1.policy).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Define VMs.
    Create,
    /// Start, stop, pause, resume, open the console of, remove and change VMs one does not own.
    Manage,
    /// Have the daemon open host paths (kernel, initrd) with its own rights.
    HostFiles,
    /// Attach VMs to switches (the administrator's bridges) without being in their group.
    Network,
}

impl Action {
    pub fn id(self) -> &'static str {
        match self {
            Action::Create => "org.vmd.vmd1.create",
            Action::Manage => "org.vmd.vmd1.manage",
            Action::HostFiles => "org.vmd.vmd1.host-files",
            Action::Network => "org.vmd.vmd1.network",
        }
    }
}

/// Whom polkit asks about.
#[derive(Debug, Clone)]
enum Subject {
    /// A client of the system bus, by its unique name.
    BusName(String),
    /// A peer-to-peer client of vmd.sock, by its process.
    Process { pid: u32 },
}

/// The caller of a method.
#[derive(Debug, Clone)]
pub struct Caller {
    pub uid: u32,
    /// Primary and supplementary groups, when known.
    pub groups: Vec<u32>,
    subject: Subject,
    /// The caller set ALLOW_INTERACTIVE_AUTHORIZATION: polkit may ask for a password.
    interactive: bool,
}

impl Caller {
    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Who this is, for people: "user alice (bus name :1.42)" or "user alice (pid 1234)".
    pub fn describe(&self) -> String {
        let user = user_name(self.uid);
        match &self.subject {
            Subject::BusName(name) => format!("user {user} (bus name {name})"),
            Subject::Process { pid } => format!("user {user} (pid {pid})"),
        }
    }

    /// The same caller, for a question polkit must answer without asking anyone (a check the
    /// caller did not ask for should never pop up a password dialog).
    pub fn without_interaction(&self) -> Caller {
        Caller {
            interactive: false,
            ..self.clone()
        }
    }
}

/// A user's name for messages (the number when the user has no name).
pub fn user_name(uid: u32) -> String {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .ok()
        .flatten()
        .map_or_else(|| format!("uid {uid}"), |user| user.name)
}

/// A group's name for messages (the number when the group has no name).
pub fn group_name(gid: u32) -> String {
    nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(gid))
        .ok()
        .flatten()
        .map_or_else(|| format!("gid {gid}"), |group| group.name)
}

fn unknown_caller(why: impl std::fmt::Display) -> VmdError {
    VmdError::NotPermitted(format!("cannot tell who is calling: {why}"))
}

/// Identifies the caller of the message `header` on `connection`.
pub async fn identify(header: &Header<'_>, connection: &Connection) -> Result<Caller, VmdError> {
    let interactive = header
        .primary()
        .flags()
        .contains(Flags::ALLOW_INTERACTIVE_AUTH);
    match header.sender() {
        // On a bus, ask the bus daemon.
        Some(sender) if connection.unique_name().is_some() => {
            let dbus = zbus::fdo::DBusProxy::new(connection)
                .await
                .map_err(unknown_caller)?;
            let credentials = dbus
                .get_connection_credentials(sender.clone().into())
                .await
                .map_err(unknown_caller)?;
            let uid = credentials
                .unix_user_id()
                .ok_or_else(|| unknown_caller("no uid"))?;
            Ok(Caller {
                uid,
                groups: credentials.unix_group_ids().cloned().unwrap_or_default(),
                subject: Subject::BusName(sender.to_string()),
                interactive,
            })
        }
        // Peer to peer (vmd.sock): the socket's credentials.
        _ => {
            let credentials = connection.peer_creds().await.map_err(unknown_caller)?;
            let uid = credentials
                .unix_user_id()
                .ok_or_else(|| unknown_caller("no uid"))?;
            let pid = credentials
                .process_id()
                .ok_or_else(|| unknown_caller("no pid"))?;
            Ok(Caller {
                uid,
                groups: credentials.unix_group_ids().cloned().unwrap_or_default(),
                subject: Subject::Process { pid },
                interactive,
            })
        }
    }
}

/// Root passes; everyone else needs polkit's yes for `action` (about `vm`, if any).
pub async fn authorize(
    bus: &Connection,
    caller: &Caller,
    action: Action,
    vm: Option<&str>,
) -> Result<(), VmdError> {
    if caller.is_root() {
        return Ok(());
    }
    let refused = |why: &str| {
        VmdError::NotPermitted(format!(
            "user {} may not do this: it needs the polkit action {}{}{why}",
            user_name(caller.uid),
            action.id(),
            vm.map(|name| format!(" for VM {name}")).unwrap_or_default(),
        ))
    };
    let subject = subject_of(caller).map_err(|e| VmdError::Failed(e.to_string()))?;
    let mut details: HashMap<&str, &str> = HashMap::new();
    if let Some(name) = vm {
        details.insert("vm", name);
    }
    // CheckAuthorizationFlags: 1 = AllowUserInteraction.
    let flags: u32 = u32::from(caller.interactive);
    let reply = bus
        .call_method(
            Some("org.freedesktop.PolicyKit1"),
            "/org/freedesktop/PolicyKit1/Authority",
            Some("org.freedesktop.PolicyKit1.Authority"),
            "CheckAuthorization",
            &(subject, action.id(), details, flags, ""),
        )
        .await
        .map_err(|e| refused(&format!(", and polkit could not be asked ({e})")))?;
    let (authorized, challenge, _details): (bool, bool, HashMap<String, String>) = reply
        .body()
        .deserialize()
        .map_err(|e| refused(&format!(", and polkit's answer was unreadable ({e})")))?;
    match (authorized, challenge) {
        (true, _) => Ok(()),
        (false, true) => Err(refused(
            " (polkit would ask for authentication: call with interactive authorization allowed)",
        )),
        (false, false) => Err(refused("")),
    }
}

/// polkit's `(sa{sv})` subject.
fn subject_of(
    caller: &Caller,
) -> zbus::Result<(&'static str, HashMap<&'static str, OwnedVariant>)> {
    let mut fields = HashMap::new();
    let kind = match &caller.subject {
        Subject::BusName(name) => {
            fields.insert(
                "name",
                OwnedVariant::try_from(Variant::from(name.as_str()))?,
            );
            "system-bus-name"
        }
        Subject::Process { pid } => {
            fields.insert("pid", OwnedVariant::try_from(Variant::from(*pid))?);
            // 0: polkit reads the start time itself. vmd cannot: ProtectProc=invisible hides
            // other users' processes from it, which is worth more than a second look here.
            fields.insert("start-time", OwnedVariant::try_from(Variant::from(0u64))?);
            fields.insert(
                "uid",
                OwnedVariant::try_from(Variant::from(caller.uid as i32))?,
            );
            "unix-process"
        }
    };
    Ok((kind, fields))
}
