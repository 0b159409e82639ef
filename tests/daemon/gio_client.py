#!/usr/bin/python3
"""A desktop-style client of vmd written with Gio (python3-gi), as a GTK application would be.

It lists every VM with one GetManagedObjects call, then starts the VM named on its command line,
shuts it down, and prints what it saw as JSON on stdout: the VMs listed, and every
PropertiesChanged of that VM (the changed properties, with State as a string) in order.
"""

import json
import sys

import gi

gi.require_version("Gio", "2.0")
from gi.repository import Gio, GLib  # noqa: E402

BUS_NAME = "org.vmd.vmd1"
MANAGER_PATH = "/org/vmd/vmd1"
VM_INTERFACE = "org.vmd.vmd1.VM"
TIMEOUT_MS = 120_000


def main():
    name = sys.argv[1]
    bus = Gio.bus_get_sync(Gio.BusType.SYSTEM, None)
    objects = bus.call_sync(
        BUS_NAME, MANAGER_PATH, "org.freedesktop.DBus.ObjectManager", "GetManagedObjects",
        None, GLib.VariantType.new("(a{oa{sa{sv}}})"), Gio.DBusCallFlags.NONE, TIMEOUT_MS, None,
    ).unpack()[0]
    listed = {}
    path = None
    for object_path, interfaces in objects.items():
        vm = interfaces.get(VM_INTERFACE)
        if vm is None:
            continue
        listed[vm["Name"]] = {"ID": vm["ID"], "State": vm["State"], "path": object_path}
        if vm["Name"] == name:
            path = object_path
    if path is None:
        print(f"no VM {name} among {sorted(listed)}", file=sys.stderr)
        sys.exit(1)

    changes = []
    loop = GLib.MainLoop()

    def on_properties_changed(_conn, _sender, _path, _iface, _signal, params):
        interface, changed, invalidated = params.unpack()
        if interface != VM_INTERFACE:
            return
        changes.append({"changed": sorted(changed), "State": changed.get("State")})
        if changed.get("State") in ("stopped", "failed"):
            loop.quit()

    bus.signal_subscribe(
        BUS_NAME, "org.freedesktop.DBus.Properties", "PropertiesChanged", path, None,
        Gio.DBusSignalFlags.NONE, on_properties_changed,
    )

    def call(method):
        bus.call_sync(BUS_NAME, path, VM_INTERFACE, method, None, None,
                      Gio.DBusCallFlags.NONE, TIMEOUT_MS, None)

    def drive():
        call("Start")
        # Start returns once the VM runs; the signals that say so may still be on their way.
        GLib.timeout_add(500, lambda: call("Shutdown") or False)
        return False

    GLib.idle_add(drive)
    GLib.timeout_add(TIMEOUT_MS, loop.quit)
    loop.run()
    print(json.dumps({"listed": listed, "changes": changes}))


if __name__ == "__main__":
    main()
