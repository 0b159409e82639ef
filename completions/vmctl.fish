# fish completion for vmctl(8), the client of vmd. VM names come from the daemon
# (`vmctl status`: the NAME column).

function __vmctl_vms
    vmctl -q status 2>/dev/null | awk 'NR > 1 { print $9 }'
end

function __vmctl_switches
    for file in /etc/vmd/switches/*.toml
        basename $file .toml
    end
end

set -l commands start stop pause unpause reboot reset status show info console log wait remove autostart edit load reload create
set -l vm_commands start stop pause unpause reboot reset status show info console log wait remove autostart edit

complete -c vmctl -f
complete -c vmctl -l socket -r -F -d 'Talk to vmd over its socket'
complete -c vmctl -s q -l quiet -d 'Print no progress notes'

complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a start -d 'Start a VM (an ad-hoc one with -k)'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a stop -d 'Stop a VM'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a pause -d 'Pause a running VM'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a unpause -d 'Resume a paused VM'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a reboot -d 'Ask the guest to reboot'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a reset -d 'Reset a VM at once'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a status -d 'Show the VMs'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a show -d 'Show the VMs'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a info -d 'Everything about one VM'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a console -d 'Attach to the serial console'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a log -d 'Console output kept in the journal'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a wait -d 'Wait until a VM has stopped'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a remove -d 'Forget a VM'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a autostart -d 'Start a VM with vmd, or not'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a edit -d 'Edit a definition in $EDITOR'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a load -d 'Define a VM from a file'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a reload -d 'Re-read /etc/vmd/vms'
complete -c vmctl -n "not __fish_seen_subcommand_from $commands" -a create -d 'Create a disk image'

complete -c vmctl -n "__fish_seen_subcommand_from $vm_commands" -a '(__vmctl_vms)'
complete -c vmctl -n "__fish_seen_subcommand_from autostart" -a 'on off'
complete -c vmctl -n "__fish_seen_subcommand_from load" -F
complete -c vmctl -n "__fish_seen_subcommand_from create" -F

complete -c vmctl -n "__fish_seen_subcommand_from start" -s c -d 'Attach to the console'
complete -c vmctl -n "__fish_seen_subcommand_from start console" -s e -x -d 'Escape character'
complete -c vmctl -n "__fish_seen_subcommand_from start" -s k -l kernel -r -F -d Kernel
complete -c vmctl -n "__fish_seen_subcommand_from start" -l initrd -r -F -d 'Initial ramdisk'
complete -c vmctl -n "__fish_seen_subcommand_from start" -l cmdline -x -d 'Kernel command line'
complete -c vmctl -n "__fish_seen_subcommand_from start" -s m -l memory -x -d Memory
complete -c vmctl -n "__fish_seen_subcommand_from start" -s p -l cpus -x -d vCPUs
complete -c vmctl -n "__fish_seen_subcommand_from start" -s d -l disk -r -F -d 'Disk image'
complete -c vmctl -n "__fish_seen_subcommand_from start" -s i -l interfaces -x -d Interfaces
complete -c vmctl -n "__fish_seen_subcommand_from start" -s n -l switch -x -a '(__vmctl_switches)' -d 'Interface on a switch'
complete -c vmctl -n "__fish_seen_subcommand_from start" -l define -d 'Keep the definition'
complete -c vmctl -n "__fish_seen_subcommand_from stop" -s a -l all -d 'All VMs'
complete -c vmctl -n "__fish_seen_subcommand_from stop" -s f -l force -d 'Kill at once'
complete -c vmctl -n "__fish_seen_subcommand_from stop" -s w -l wait -d 'Wait until stopped'
complete -c vmctl -n "__fish_seen_subcommand_from stop wait" -l timeout -x -d 'Seconds to wait'
complete -c vmctl -n "__fish_seen_subcommand_from status show" -s r -d 'Only running VMs'
complete -c vmctl -n "__fish_seen_subcommand_from console" -l force -d 'Take the console over'
complete -c vmctl -n "__fish_seen_subcommand_from log" -s f -l follow -d Follow
complete -c vmctl -n "__fish_seen_subcommand_from log" -s n -l lines -x -d 'Last lines'
complete -c vmctl -n "__fish_seen_subcommand_from create" -s b -r -F -d 'Base image'
complete -c vmctl -n "__fish_seen_subcommand_from create" -s i -r -F -d 'Input image'
complete -c vmctl -n "__fish_seen_subcommand_from create" -s s -x -d Size
