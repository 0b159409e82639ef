# bash completion for vmctl(8), the client of vmd. VM names come from the daemon
# (`vmctl status`: the NAME column).

_vmctl_vms() {
    vmctl -q "$@" status 2>/dev/null | awk 'NR > 1 { print $9 }'
}

_vmctl() {
    local cur prev words cword
    _init_completion || return

    local commands="start stop pause unpause reboot reset status show info console log wait
        remove autostart edit load reload create help"
    local socket=() i command=
    for ((i = 1; i < cword; i++)); do
        case ${words[i]} in
        --socket) socket=(--socket "${words[i + 1]}"); ((i++)) ;;
        -*) ;;
        *) command=${words[i]}; break ;;
        esac
    done

    if [[ $prev == --socket ]]; then
        _filedir
        return
    fi
    if [[ -z $command ]]; then
        COMPREPLY=($(compgen -W "$commands --socket --quiet --help --version" -- "$cur"))
        return
    fi

    case $command in
    start)
        case $prev in
        -k | -b | --kernel | --initrd) _filedir; return ;;
        -d | --disk) _filedir; return ;;
        -m | --memory | -p | --cpus | -i | --interfaces | --cmdline | -e) return ;;
        -n | --switch)
            local switches=(/etc/vmd/switches/*.toml)
            [[ -e ${switches[0]} ]] &&
                COMPREPLY=($(compgen -W "$(basename -s .toml "${switches[@]}")" -- "$cur"))
            return
            ;;
        esac
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-c -e -k --kernel --initrd --cmdline -m --memory -p --cpus
                -d --disk -i --interfaces -n --switch --define" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    stop)
        [[ $prev == --timeout ]] && return
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-a --all -f --force -w --wait --timeout" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    status | show)
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-r" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    console)
        [[ $prev == -e ]] && return
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-e --force" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    log)
        [[ $prev == -n || $prev == --lines ]] && return
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-f --follow -n --lines" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    wait)
        [[ $prev == --timeout ]] && return
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "--timeout" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        fi
        ;;
    autostart)
        if [[ $prev == autostart ]]; then
            COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        else
            COMPREPLY=($(compgen -W "on off" -- "$cur"))
        fi
        ;;
    pause | unpause | reboot | reset | info | remove | edit)
        COMPREPLY=($(compgen -W "$(_vmctl_vms "${socket[@]}")" -- "$cur"))
        ;;
    load)
        _filedir toml
        ;;
    create)
        case $prev in
        -s) return ;;
        esac
        if [[ $cur == -* ]]; then
            COMPREPLY=($(compgen -W "-b -i -s" -- "$cur"))
        else
            _filedir
        fi
        ;;
    esac
} &&
    complete -F _vmctl vmctl
